"""Test support, one module per world; the root conftest.py loads each as a pytest plugin.

- ``users``: real Unix users (``unix_users``), ``need`` and ``need_module`` (skip locally,
  fail under ``CI=true``), running a command as a user, ``shared_dir``, ``wait_for``.
- ``broker``: a real ``gpulane broker`` process (``BrokerProcess``, ``make_broker``).
- ``kernels``: real IPython kernels run as test users (``UserKernel``, ``kernels``).
- ``slurm``: a real one-node Slurm cluster (``SlurmCluster``, ``slurm_cluster``).
- ``hubs``: real JupyterHubs (``launch_hub``, ``running_demo_hub``, ``hub``).
- ``hubclient``: a small client that logs in to a hub and runs cells over its websocket.

Test files import helpers from here (``from tests.support.users import need``), and use the
fixtures by name.
"""
