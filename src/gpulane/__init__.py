"""gpulane: share GPUs fairly from JupyterHub; GPU work queues only while it runs."""

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext gpulane``: registers ``%%gpu`` and ``%gpu``."""
    from gpulane.kernel.magic import GpuMagics, hoist_gpu_magic

    ipython.register_magics(GpuMagics(ipython))  # type: ignore[attr-defined]
    cleanup = ipython.input_transformers_cleanup  # type: ignore[attr-defined]
    if hoist_gpu_magic not in cleanup:
        cleanup.insert(0, hoist_gpu_magic)
