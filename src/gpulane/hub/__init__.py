"""gpulane inside JupyterHub: ``configure(c)`` in jupyterhub_config.py sets everything up."""

from gpulane.hub.config import GpulaneHub, configure, install_kernel_extension

__all__ = ["GpulaneHub", "configure", "install_kernel_extension"]
