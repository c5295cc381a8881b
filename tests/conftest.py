"""The test support modules, loaded as pytest plugins so every test sees their fixtures.

Each world has its own module under tests/support/; test files import helpers from there
(``from tests.support.users import need``), never from this file.
"""

pytest_plugins = [
    "tests.support.users",
    "tests.support.broker",
    "tests.support.kernels",
    "tests.support.slurm",
    "tests.support.hubs",
    "tests.support.inprocess_broker",
]
