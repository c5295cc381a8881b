"""The profile model: what a profile file describes, and how its values are written.

Every other part of :mod:`gpulane.profiles` builds or reads these frozen types.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gpulane.config import GPU_MEMORY_FRACTION_ENV, GPU_MEMORY_LIMIT_ENV
from gpulane.errors import GpulaneError


class ProfileError(GpulaneError, ValueError):
    """A profile file or a spawn form is not acceptable; one line naming the field and the fix."""


CUSTOM_SLUG = "custom"
DEFAULT_SLICE_RESOURCE = "nvidia.com/gpu"

# registry/name:tag, where the registry is a host name with a dot or a port, or localhost.
# Written so that the same text works as an HTML pattern attribute (JavaScript's v flag).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_HOST_LABEL = r"[a-z0-9]+(?:-+[a-z0-9]+)*"
_PORT = r"(?::[0-9]{1,5})"
_REGISTRY = rf"(?:localhost{_PORT}?|{_HOST_LABEL}(?:\.{_HOST_LABEL})+{_PORT}?|{_HOST_LABEL}{_PORT})"
IMAGE_PATTERN = (
    rf"^{_REGISTRY}/{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r":[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}(?:@sha256:[a-f0-9]{64})?$"
)
IMAGE_RE = re.compile(IMAGE_PATTERN)
IMAGE_FORMS = "registry/name:tag, such as quay.io/jupyter/scipy-notebook:2024-12-02"

SLUG_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
RESOURCE_RE = re.compile(
    r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
)

MAX_GPUS = 64
MAX_SLICES_PER_GPU = 64
MAX_CPUS = 1024.0
MIN_MEMORY = 1024**2
MAX_MEMORY = 1024**5
MAX_CHOICES = 32
MAX_FIELD_CHARS = 300


@dataclass(frozen=True)
class Profile:
    """One server a user may start."""

    slug: str
    display_name: str
    description: str
    cpu_limit: float | None
    cpu_guarantee: float | None
    mem_limit: int | None  # bytes
    mem_guarantee: int | None  # bytes
    gpus: int  # whole GPUs; 0 = CPU only
    slices: int  # slices of one GPU; 0 = whole GPUs (exclusive with gpus > 0)
    image: str | None
    groups: frozenset[str]  # empty: everyone
    default: bool = False
    gpu_mem: int | None = None  # bytes of one GPU's memory (exclusive with gpus and slices)

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0 or self.slices > 0 or self.gpu_mem is not None

    def open_to(self, groups: Iterable[str]) -> bool:
        return not self.groups or not self.groups.isdisjoint(groups)


@dataclass(frozen=True)
class CustomChoices:
    """The custom profile: every value picked from a bounded list (or checked free text)."""

    groups: frozenset[str]
    images: tuple[str, ...]
    free_image: bool
    gpus: tuple[int, ...]
    slices: tuple[int, ...]
    cpus: tuple[float, ...]
    memory: tuple[int, ...]
    display_name: str = "Custom"
    description: str = "Choose the image, GPUs, CPUs and memory."

    def open_to(self, groups: Iterable[str]) -> bool:
        return not self.groups or not self.groups.isdisjoint(groups)

    @property
    def gpu_options(self) -> tuple[tuple[int, int], ...]:
        """The GPU choices as (whole GPUs, slices) pairs, in form order; the first is the default."""
        return tuple((g, 0) for g in self.gpus) + tuple((0, k) for k in self.slices)


@dataclass(frozen=True)
class ProfileSet:
    profiles: tuple[Profile, ...]
    custom: CustomChoices | None
    slices_per_gpu: int = 1
    gpu_memory: int | None = None  # bytes per GPU, for slice memory shares
    slice_resource: str = DEFAULT_SLICE_RESOURCE  # the Kubernetes resource one slice is

    def profile(self, slug: str) -> Profile | None:
        return next((p for p in self.profiles if p.slug == slug), None)


def gpu_choice_key(gpus: int, slices: int) -> str:
    """How a GPU choice is written in a form: ``none``, ``gpus-2``, ``slices-1``."""
    if gpus:
        return f"gpus-{gpus}"
    if slices:
        return f"slices-{slices}"
    return "none"


def gpu_choice_label(gpus: int, slices: int, pset: ProfileSet | None = None) -> str:
    if gpus:
        return f"{gpus} whole GPU{'s' if gpus > 1 else ''}"
    if not slices:
        return "No GPU"
    if pset is None or pset.slices_per_gpu < 2:
        return f"{slices} GPU slice{'s' if slices > 1 else ''}"
    label = f"{slices} of {pset.slices_per_gpu} slices of a GPU"
    if pset.gpu_memory:
        share = pset.gpu_memory * slices // pset.slices_per_gpu
        label += f" ({describe_memory(share)} GPU memory)"
    return label


# ---------------------------------------------------------------------------- writing values


def format_memory(size: int) -> str:
    """The short form a size is written in: ``8G``, ``512M``, or bytes."""
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def describe_memory(size: int) -> str:
    """``8 GiB``, ``1.5 GiB``, ``512 MiB`` for people."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} B"


def format_cpus(value: float) -> str:
    """``2``, ``0.5``: how a CPU count is written in forms and messages."""
    return f"{value:g}"


def short_repr(value: object) -> str:
    """``repr(value)`` cut to 60 characters, for quoting user input in a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_profile(profile: Profile, pset: ProfileSet | None = None) -> str:
    """``4 CPUs (1 guaranteed) · 8 GiB memory · 1 of 4 slices of a GPU (8 GiB GPU memory)``."""
    parts = []
    if profile.cpu_limit is not None:
        cpus = f"{format_cpus(profile.cpu_limit)} CPUs"
        if profile.cpu_guarantee is not None and profile.cpu_guarantee != profile.cpu_limit:
            cpus += f" ({format_cpus(profile.cpu_guarantee)} guaranteed)"
        parts.append(cpus)
    if profile.mem_limit is not None:
        memory = f"{describe_memory(profile.mem_limit)} memory"
        if profile.mem_guarantee is not None and profile.mem_guarantee != profile.mem_limit:
            memory += f" ({describe_memory(profile.mem_guarantee)} guaranteed)"
        parts.append(memory)
    if profile.gpus:
        parts.append(f"{profile.gpus} whole GPU{'s' if profile.gpus > 1 else ''}")
    elif profile.gpu_mem is not None:
        parts.append(f"{describe_memory(profile.gpu_mem)} of a GPU's memory")
    elif profile.slices:
        text = f"{profile.slices} slice{'s' if profile.slices > 1 else ''} of a GPU"
        if pset is not None and pset.slices_per_gpu > 1:
            text = f"{profile.slices} of {pset.slices_per_gpu} slices of a GPU"
            if pset.gpu_memory:
                share = pset.gpu_memory * profile.slices // pset.slices_per_gpu
                text += f" ({describe_memory(share)} GPU memory)"
        parts.append(text)
    else:
        parts.append("no GPU")
    return " · ".join(parts)


# ---------------------------------------------------------------------------- GPU memory shares


def slice_fraction(profile: Profile, pset: ProfileSet) -> float | None:
    """The share of one GPU's memory a slice profile may use; None for whole GPUs or none."""
    if profile.slices <= 0:
        return None
    return min(1.0, profile.slices / max(1, pset.slices_per_gpu))


def gpu_environment(profile: Profile, pset: ProfileSet) -> dict[str, str]:
    """Environment that caps PyTorch, TensorFlow and JAX at a slice's share of GPU memory.

    Time-slicing shares a GPU's compute but not its memory: without a cap, the first
    framework to start takes the whole card. JAX reads XLA_PYTHON_CLIENT_MEM_FRACTION
    itself; gpulane's kernel extension applies the PyTorch and TensorFlow caps from the
    GPULANE_* variables. Whole GPUs and CPU-only profiles get nothing.
    """
    fraction = slice_fraction(profile, pset)
    if fraction is None and profile.gpu_mem is None:
        return {}
    if pset.gpu_memory is None:
        raise ProfileError(
            f"profile {profile.slug!r} uses part of a GPU but [gpu] memory is not set; "
            'give the memory of one GPU, such as "32G"'
        )
    limit = int(pset.gpu_memory * (fraction or 0.0))
    if profile.gpu_mem is not None:  # its own --gpu-mem: that much of the card
        limit, fraction = profile.gpu_mem, min(1.0, profile.gpu_mem / pset.gpu_memory)
    assert fraction is not None
    return {
        GPU_MEMORY_LIMIT_ENV: str(limit),
        GPU_MEMORY_FRACTION_ENV: f"{fraction:.4f}",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.4f}",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }
