"""The ``GPULANE_*`` names a GPU worker reads before its first cell's code.

Defined here, with nothing imported, and listed with their defaults and meanings in
:data:`gpulane.config.ENVIRONMENT` (which imports them from here): a cold worker
(a Slurm node) needs only these names, and ``gpulane.config`` costs it ~6 ms of
imports (dataclasses, pathlib) before the cell's first line.
"""

GPU_MEMORY_LIMIT_ENV = "GPULANE_GPU_MEMORY_LIMIT"
GPU_MEMORY_FRACTION_ENV = "GPULANE_GPU_MEMORY_FRACTION"
RUNNER_FD_ENV = "GPULANE_RUNNER_FD"
RUNNER_ADDRESS_ENV = "GPULANE_RUNNER_ADDRESS"
RUNNER_KEYFILE_ENV = "GPULANE_RUNNER_KEYFILE"
