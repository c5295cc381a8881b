"""gpulane inside JupyterHub: ``configure(c)`` in jupyterhub_config.py sets everything up."""

from gpulane.hub.config import GpulaneHub, configure, install_kernel_extension


def configure_oidc(*args: object, **kwargs: object) -> None:
    """OIDC login with groups from a claim; see :func:`gpulane.hub.oidc.configure_oidc`."""
    from gpulane.hub.oidc import configure_oidc as _configure_oidc

    _configure_oidc(*args, **kwargs)  # type: ignore[arg-type]


__all__ = ["GpulaneHub", "configure", "configure_oidc", "install_kernel_extension"]
