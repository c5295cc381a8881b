"""Reading a profile file: every value checked, every problem one line naming where.

:func:`load_profiles_file` reads the TOML; :func:`load_profiles` validates a table
already read into a :class:`~gpulane.profiles.model.ProfileSet`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpulane.jobs import size_in_bytes
from gpulane.profiles.model import (
    CUSTOM_SLUG,
    DEFAULT_SLICE_RESOURCE,
    IMAGE_FORMS,
    IMAGE_RE,
    MAX_CHOICES,
    MAX_CPUS,
    MAX_GPUS,
    MAX_MEMORY,
    MAX_SLICES_PER_GPU,
    MIN_MEMORY,
    RESOURCE_RE,
    SLUG_RE,
    CustomChoices,
    Profile,
    ProfileError,
    ProfileSet,
    format_cpus,
    format_memory,
)
from gpulane.profiles.model import short_repr as _short

# The profile file's wording; the units are the ones ``--mem`` reads (jobs.py).
MEMORY_FORMS = "a size such as 512M, 8G or 1.5T (K, M, G, T: powers of 1024)"
_GROUP_RE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


# ---------------------------------------------------------------------------- parsing values


def parse_profile_memory(value: Any, where: str) -> int:
    """Bytes from ``"8G"``, ``"512M"``, ``"1.5T"`` or a whole number of bytes (a TOML integer).

    The units and their grammar are :func:`gpulane.jobs.size_in_bytes`'s, which ``--mem``
    reads too; a profile's own bounds (1M to 1P) and messages apply on top.
    """
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and len(value) <= 40:
        size = size_in_bytes(value)
    if size is None:
        raise ProfileError(f"{where} {value!r} is not a size; use {MEMORY_FORMS}")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ProfileError(f"{where} {value!r} must be from 1M to 1P")
    return int(size)


def _cpus(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{where} {value!r} must be a number of CPUs, such as 2 or 0.5")
    number = float(value)
    if not math.isfinite(number) or not 0.01 <= number <= MAX_CPUS:
        raise ProfileError(f"{where} {value!r} must be from 0.01 to {MAX_CPUS:g} CPUs")
    return number


def _whole(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProfileError(f"{where} {value!r} must be a whole number from {low} to {high}")
    return value


def _text(value: Any, where: str, limit: int = 1000) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ProfileError(f"{where} must be text of at most {limit} characters")
    return value.strip()


def _image(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 256 or not IMAGE_RE.fullmatch(value):
        raise ProfileError(f"{where} {_short(value)} must look like {IMAGE_FORMS}")
    return value


def _groups(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(g, str) and _GROUP_RE.fullmatch(g) for g in value
    ):
        raise ProfileError(f'{where} must be a list of group names, such as ["gpu", "hpc"]')
    return frozenset(value)


def _list(value: Any, where: str, example: str) -> list[Any]:
    if not isinstance(value, list | tuple) or len(value) > MAX_CHOICES:
        raise ProfileError(
            f"{where} must be a list of at most {MAX_CHOICES} values, such as {example}"
        )
    return list(value)


def _unique(values: Sequence[Any], where: str) -> None:
    if len(set(values)) != len(values):
        raise ProfileError(f"{where} lists a value twice")


def _check_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    known = sorted(known)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
        )


# ---------------------------------------------------------------------------- loading

_TOP_KEYS = ("gpu", "profile", "custom")
_GPU_KEYS = ("slices_per_gpu", "memory", "slice_resource")
_PROFILE_KEYS = (
    "slug", "display_name", "description", "cpu_limit", "cpu_guarantee", "mem_limit",
    "mem_guarantee", "gpus", "slices", "gpu_mem", "image", "groups", "default",
)  # fmt: skip
_CUSTOM_KEYS = (
    "groups", "images", "free_image", "gpus", "slices", "cpus", "memory", "display_name",
    "description",
)  # fmt: skip


def load_profiles(data: Mapping[str, Any]) -> ProfileSet:
    """Validate a profile configuration (as read from TOML) into a :class:`ProfileSet`."""
    if not isinstance(data, Mapping):
        raise ProfileError(
            "the profile configuration must be a table of [gpu], [[profile]], [custom]"
        )
    _check_keys(data, _TOP_KEYS, "profile file")
    gpu = data.get("gpu", {})
    if not isinstance(gpu, Mapping):
        raise ProfileError("[gpu] must be a table: slices_per_gpu, memory, slice_resource")
    _check_keys(gpu, _GPU_KEYS, "[gpu]")
    slices_per_gpu = _whole(
        gpu.get("slices_per_gpu", 1), "[gpu] slices_per_gpu", 1, MAX_SLICES_PER_GPU
    )
    gpu_memory = parse_profile_memory(gpu["memory"], "[gpu] memory") if "memory" in gpu else None
    slice_resource = gpu.get("slice_resource", DEFAULT_SLICE_RESOURCE)
    if not isinstance(slice_resource, str) or not RESOURCE_RE.fullmatch(slice_resource):
        raise ProfileError(
            f"[gpu] slice_resource {_short(slice_resource)} must be a Kubernetes resource name "
            "such as nvidia.com/gpu or nvidia.com/gpu.shared"
        )
    context = _Context(slices_per_gpu, gpu_memory)

    raw_profiles = data.get("profile", [])
    if not isinstance(raw_profiles, list) or not all(isinstance(p, Mapping) for p in raw_profiles):
        raise ProfileError("profiles must be [[profile]] tables")
    profiles = tuple(
        _load_profile(raw, index + 1, context) for index, raw in enumerate(raw_profiles)
    )
    slugs = [p.slug for p in profiles]
    for slug in slugs:
        if slugs.count(slug) > 1:
            raise ProfileError(f"profile {slug!r} is defined twice; slugs must be unique")
    defaults = [p.slug for p in profiles if p.default]
    if len(defaults) > 1:
        raise ProfileError(
            f"profiles {', '.join(map(repr, defaults))} all say default = true; keep one"
        )

    custom = None
    if "custom" in data:
        if not isinstance(data["custom"], Mapping):
            raise ProfileError("[custom] must be a table")
        custom = _load_custom(data["custom"], context)
    if not profiles and custom is None:
        raise ProfileError("no profiles: add at least one [[profile]] (or a [custom] table)")
    return ProfileSet(profiles, custom, slices_per_gpu, gpu_memory, slice_resource)


@dataclass(frozen=True)
class _Context:
    slices_per_gpu: int
    gpu_memory: int | None

    def check_slices(self, slices: int, where: str) -> None:
        if slices < 1:
            return
        if self.slices_per_gpu < 2:
            raise ProfileError(
                f"{where} = {slices} needs [gpu] slices_per_gpu of 2 or more "
                "(how many slices each GPU is cut into)"
            )
        if slices > self.slices_per_gpu:
            raise ProfileError(
                f"{where} = {slices} is more than a GPU has: use 1 to {self.slices_per_gpu} "
                f"([gpu] slices_per_gpu = {self.slices_per_gpu})"
            )
        if self.gpu_memory is None:
            raise ProfileError(
                f"{where} = {slices} needs [gpu] memory (the memory of one GPU, such as "
                '"32G") so that each slice is given its share of GPU memory'
            )


def _load_profile(raw: Mapping[str, Any], index: int, context: _Context) -> Profile:
    slug = raw.get("slug")
    if not isinstance(slug, str) or not SLUG_RE.fullmatch(slug):
        raise ProfileError(
            f"profile #{index}: slug {_short(slug)} must be 1-40 lower-case letters, digits "
            "or '-', such as \"gpu-slice\""
        )
    where = f"profile {slug!r}"
    if slug == CUSTOM_SLUG:
        raise ProfileError(f"{where}: the slug {CUSTOM_SLUG!r} is kept for the [custom] table")
    _check_keys(raw, _PROFILE_KEYS, where)
    display_name = _text(raw.get("display_name", slug), f"{where}: display_name", 100) or slug
    description = _text(raw.get("description", ""), f"{where}: description")
    cpu_limit = _cpus(raw["cpu_limit"], f"{where}: cpu_limit") if "cpu_limit" in raw else None
    cpu_guarantee = (
        _cpus(raw["cpu_guarantee"], f"{where}: cpu_guarantee") if "cpu_guarantee" in raw else None
    )
    if cpu_limit is not None and cpu_guarantee is not None and cpu_guarantee > cpu_limit:
        raise ProfileError(
            f"{where}: cpu_guarantee {format_cpus(cpu_guarantee)} is above cpu_limit "
            f"{format_cpus(cpu_limit)}; a guarantee must be at most the limit"
        )
    mem_limit = (
        parse_profile_memory(raw["mem_limit"], f"{where}: mem_limit")
        if "mem_limit" in raw
        else None
    )
    mem_guarantee = (
        parse_profile_memory(raw["mem_guarantee"], f"{where}: mem_guarantee")
        if "mem_guarantee" in raw
        else None
    )
    if mem_limit is not None and mem_guarantee is not None and mem_guarantee > mem_limit:
        raise ProfileError(
            f"{where}: mem_guarantee {format_memory(mem_guarantee)} is above mem_limit "
            f"{format_memory(mem_limit)}; a guarantee must be at most the limit"
        )
    gpus = _whole(raw.get("gpus", 0), f"{where}: gpus", 0, MAX_GPUS)
    slices = _whole(raw.get("slices", 0), f"{where}: slices", 0, MAX_SLICES_PER_GPU)
    if gpus and slices:
        raise ProfileError(
            f"{where}: gpus = {gpus} and slices = {slices} exclude each other; "
            "give whole GPUs or slices of one GPU"
        )
    context.check_slices(slices, f"{where}: slices")
    gpu_mem = _gpu_mem(raw, where, context, gpus or slices)
    image = _image(raw["image"], f"{where}: image") if "image" in raw else None
    groups = _groups(raw.get("groups", []), f"{where}: groups")
    default = raw.get("default", False)
    if not isinstance(default, bool):
        raise ProfileError(f"{where}: default must be true or false")
    return Profile(
        slug=slug,
        display_name=display_name,
        description=description,
        cpu_limit=cpu_limit,
        cpu_guarantee=cpu_guarantee,
        mem_limit=mem_limit,
        mem_guarantee=mem_guarantee,
        gpus=gpus,
        slices=slices,
        image=image,
        groups=groups,
        default=default,
        gpu_mem=gpu_mem,
    )


def _gpu_mem(raw: Mapping[str, Any], where: str, context: _Context, other: int) -> int | None:
    """A profile's ``gpu_mem`` (memory of one GPU, as ``--gpu-mem``), checked."""
    if "gpu_mem" not in raw:
        return None
    size = parse_profile_memory(raw["gpu_mem"], f"{where}: gpu_mem")
    if other:
        raise ProfileError(
            f"{where}: gpu_mem asks for memory of one GPU; leave out gpus and slices"
        )
    if context.gpu_memory is None:
        raise ProfileError(
            f'{where}: gpu_mem needs [gpu] memory (the memory of one GPU, such as "32G")'
        )
    if size > context.gpu_memory:
        raise ProfileError(
            f"{where}: gpu_mem {format_memory(size)} is more than a GPU has "
            f"([gpu] memory = {format_memory(context.gpu_memory)})"
        )
    return size


def _load_custom(raw: Mapping[str, Any], context: _Context) -> CustomChoices:
    where = "[custom]"
    _check_keys(raw, _CUSTOM_KEYS, where)
    images = tuple(
        _image(v, f"{where} images:")
        for v in _list(
            raw.get("images", []),
            f"{where} images",
            '["quay.io/jupyter/scipy-notebook:2024-12-02"]',
        )
    )
    _unique(images, f"{where} images")
    free_image = raw.get("free_image", False)
    if not isinstance(free_image, bool):
        raise ProfileError(f"{where} free_image must be true or false")
    gpus = tuple(
        _whole(v, f"{where} gpus:", 0, MAX_GPUS)
        for v in _list(raw.get("gpus", [0]), f"{where} gpus", "[0, 1, 2]")
    )
    slices = tuple(
        _whole(v, f"{where} slices:", 1, MAX_SLICES_PER_GPU)
        for v in _list(raw.get("slices", []), f"{where} slices", "[1, 2]")
    )
    if not gpus and not slices:
        raise ProfileError(f"{where} gpus is empty; list at least 0 (CPU only), such as [0, 1]")
    for value in slices:
        context.check_slices(value, f"{where} slices")
    if "cpus" not in raw or "memory" not in raw:
        raise ProfileError(
            f'{where} needs cpus and memory lists, such as cpus = [2, 4] and memory = ["8G", "16G"]'
        )
    cpus = tuple(
        _cpus(v, f"{where} cpus:") for v in _list(raw["cpus"], f"{where} cpus", "[2, 4, 8]")
    )
    memory = tuple(
        parse_profile_memory(v, f"{where} memory:")
        for v in _list(raw["memory"], f"{where} memory", '["8G", "16G"]')
    )
    for name, values in (("gpus", gpus), ("slices", slices), ("cpus", cpus), ("memory", memory)):
        _unique(values, f"{where} {name}")
    if not cpus or not memory:
        raise ProfileError(f"{where} cpus and memory must each list at least one value")
    return CustomChoices(
        groups=_groups(raw.get("groups", []), f"{where} groups"),
        images=images,
        free_image=free_image,
        gpus=gpus,
        slices=slices,
        cpus=cpus,
        memory=memory,
        display_name=_text(raw.get("display_name", "Custom"), f"{where} display_name", 100)
        or "Custom",
        description=_text(
            raw.get("description", CustomChoices.description), f"{where} description"
        ),
    )


def load_profiles_file(path: str | os.PathLike[str]) -> ProfileSet:
    """Read and validate a TOML profile file; every problem is a one-line :class:`ProfileError`."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ProfileError(
            f"cannot read the profile file {os.fspath(path)}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{os.fspath(path)} is not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{os.fspath(path)} is not UTF-8 text") from None
    try:
        return load_profiles(data)
    except ProfileError as error:
        raise ProfileError(f"{os.fspath(path)}: {error}") from None
