"""The demos: a shared-GPU JupyterHub with demo users, and two users queueing in a terminal."""
