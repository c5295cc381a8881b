"""gpulane: share GPUs fairly from JupyterHub; GPU work queues only while it runs."""

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext gpulane``: registers ``%%gpu`` and ``%gpu``."""
    import os

    from gpulane.kernel import memory_caps
    from gpulane.kernel.magic import GpuMagics, hoist_gpu_magic

    # A server started on a GPU slice (a GPU profile) caps the frameworks in its kernels too.
    memory_caps.install(os.environ)

    ipython.register_magics(GpuMagics(ipython))  # type: ignore[attr-defined]
    cleanup = ipython.input_transformers_cleanup  # type: ignore[attr-defined]
    if hoist_gpu_magic not in cleanup:
        cleanup.insert(0, hoist_gpu_magic)
