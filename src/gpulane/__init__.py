"""gpulane: share GPUs fairly from JupyterHub; GPU work queues only while it runs."""

__version__ = "0.1.0"
