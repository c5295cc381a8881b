"""GPU memory caps for a job on slices of a shared GPU, applied in the worker before user code.

Time-slicing shares a card's compute, not its memory: each framework must be
told to stay within the job's share. JAX reads an environment variable; PyTorch
and TensorFlow need a call once they are imported, so an import hook makes that
call right after ``import torch`` / ``import tensorflow`` in the cell.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import importlib.machinery

from gpulane.worker_env import GPU_MEMORY_FRACTION_ENV, GPU_MEMORY_LIMIT_ENV

LIMIT_ENV = GPU_MEMORY_LIMIT_ENV
FRACTION_ENV = GPU_MEMORY_FRACTION_ENV

applied: list[str] = []  # what was capped, for the notebook and the tests


def _limit(env: MutableMapping[str, str]) -> tuple[int, float] | None:
    try:
        return int(env[LIMIT_ENV]), float(env[FRACTION_ENV])
    except (KeyError, ValueError):
        return None


def install(env: MutableMapping[str, str]) -> list[str]:
    """Apply the caps the environment asks for; returns notes worth showing the user."""
    cap = _limit(env)
    if cap is None:
        return []
    limit, fraction = cap
    # JAX/XLA: preallocate only this share of the card.
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    # TensorFlow would otherwise take the whole card at start; the hard cap follows on import.
    env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    applied.append(f"jax: XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.4f}")
    hooks: dict[str, Callable[[ModuleType], None]] = {
        "torch": lambda module: _cap_torch(module, fraction),
        "tensorflow": lambda module: _cap_tensorflow(module, limit),
    }
    for name, hook in hooks.items():
        if name in sys.modules:
            hook(sys.modules[name])
    sys.meta_path.insert(0, _AfterImport({k: v for k, v in hooks.items() if k not in sys.modules}))
    return []


def _cap_torch(torch: Any, fraction: float) -> None:
    if not torch.cuda.is_available():
        applied.append("torch: no CUDA device visible, nothing to cap")
        return
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(fraction, index)
    applied.append(f"torch: per-process memory fraction {fraction:.4f}")


def _cap_tensorflow(tf: Any, limit: int) -> None:
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.set_logical_device_configuration(
            gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit // (1024 * 1024))]
        )
    applied.append(f"tensorflow: memory limit {limit // (1024 * 1024)} MiB on {len(gpus)} GPU(s)")


class _AfterImport:
    """Run a callback right after a top-level module has been imported (once).

    A meta path finder by its ``find_spec`` alone: ``importlib.abc`` costs a cold worker
    ~20 ms of imports (``importlib.resources``) before its first line."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        callback = self.callbacks.pop(fullname, None)
        if callback is None:
            return None
        import importlib.util

        spec = importlib.util.find_spec(fullname)  # the other finders; we no longer match it
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            callback(module)

        loader.exec_module = exec_module
        return spec


def oom_hint(etype: Any, evalue: Any, env: MutableMapping[str, str]) -> str | None:
    """For an out-of-memory error: what this job may use and how to ask for more."""
    name = getattr(etype, "__name__", "")
    text = str(evalue)
    if not (
        "OutOfMemory" in name or "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text
    ):
        return None
    cap = _limit(env)
    if cap is None:
        return "The GPU ran out of memory. Use smaller batches, or ask for more GPUs with --gpus."
    limit, fraction = cap
    from gpulane.jobs import format_bytes  # only for this message: not on a cold start

    return (
        f"This job was given {format_bytes(limit)} of GPU memory ({fraction:.0%} of the card); "
        "ask for more with --gpu-mem (e.g. --gpu-mem 16G), a larger --slices, "
        "or --gpus 1 for a whole card."
    )
