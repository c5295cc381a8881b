"""Server profiles: one declarative file, validated at start-up, shared by every spawner.

A profile file (TOML) lists the servers users may start::

    [gpu]
    slices_per_gpu = 4        # time-sliced slices of each GPU (Kubernetes: replicas)
    memory = "32G"            # memory of one GPU; a slice gets its share

    [[profile]]
    slug = "cpu"
    display_name = "CPU only"
    cpu_limit = 2
    mem_limit = "4G"
    default = true

    [[profile]]
    slug = "gpu-slice"
    display_name = "One GPU slice"
    slices = 1
    groups = ["gpu"]

    [custom]                  # a profile whose values the user picks from bounded lists
    groups = ["hpc"]
    images = ["quay.io/jupyter/pytorch-notebook:cuda12-2024-12-02"]
    free_image = true         # also any image that looks like registry/name:tag
    gpus = [0, 1, 2]
    slices = [1, 2]
    cpus = [2, 4, 8]
    memory = ["8G", "16G", "32G"]

Anything off (an unknown key, a guarantee above its limit, a slice count the GPU
does not have) is a :class:`ProfileError` naming the profile, the field and what
is accepted. The spawn form is user input: :func:`resolve_form` checks it again
against what the user's groups allow. Standard library only.
"""

from __future__ import annotations

import html
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ProfileError(ValueError):
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
_GROUP_RE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
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

_UNIT_BYTES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
MEMORY_FORMS = "a size such as 512M, 8G or 1.5T (K, M, G, T: powers of 1024)"


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

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0 or self.slices > 0

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


# ---------------------------------------------------------------------------- parsing values


def parse_memory(value: Any, where: str) -> int:
    """Bytes from ``"8G"``, ``"512M"``, ``"1.5T"`` or a whole number of bytes."""
    if isinstance(value, bool):
        raise ProfileError(f"{where} {value!r} is not a size; use {MEMORY_FORMS}")
    if isinstance(value, int):
        size: float = value
    elif isinstance(value, str) and len(value) <= 40:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?", value.strip().lower())
        if not match:
            raise ProfileError(f"{where} {value!r} is not a size; use {MEMORY_FORMS}")
        size = float(match.group(1)) * _UNIT_BYTES[match.group(2)]
    else:
        raise ProfileError(f"{where} {value!r} is not a size; use {MEMORY_FORMS}")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ProfileError(f"{where} {value!r} must be from 1M to 1P")
    return int(size)


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    "mem_guarantee", "gpus", "slices", "image", "groups", "default",
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
    gpu_memory = parse_memory(gpu["memory"], "[gpu] memory") if "memory" in gpu else None
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
        parse_memory(raw["mem_limit"], f"{where}: mem_limit") if "mem_limit" in raw else None
    )
    mem_guarantee = (
        parse_memory(raw["mem_guarantee"], f"{where}: mem_guarantee")
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
    )


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
        parse_memory(v, f"{where} memory:")
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


# ---------------------------------------------------------------------------- what a user sees


def visible_profiles(pset: ProfileSet, groups: Iterable[str]) -> list[Profile]:
    """The profiles the user's groups allow, the default first (else in file order)."""
    groups = frozenset(groups)
    visible = [p for p in pset.profiles if p.open_to(groups)]
    visible.sort(key=lambda p: not p.default)
    return visible


def visible_custom(pset: ProfileSet, groups: Iterable[str]) -> CustomChoices | None:
    """The custom profile's choices when the user's groups allow it, else None."""
    if pset.custom is not None and pset.custom.open_to(frozenset(groups)):
        return pset.custom
    return None


def _field(form: Mapping[str, Any], name: str) -> str | None:
    values = form.get(name)
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list | tuple) or len(values) != 1 or not isinstance(values[0], str):
        raise ProfileError(f"the form field {name!r} must be given once")
    value: str = values[0].strip()
    if len(value) > MAX_FIELD_CHARS:
        raise ProfileError(f"the form field {name!r} is longer than {MAX_FIELD_CHARS} characters")
    return value


def resolve_form(pset: ProfileSet, groups: Iterable[str], form: Mapping[str, list[str]]) -> Profile:
    """The profile a posted spawn form asks for, checked against what the user's groups allow.

    ``form`` is JupyterHub's form data (a dict of lists of strings). Fields other than
    ``profile`` and, for the custom profile, ``image``, ``gpus``, ``slices``, ``cpus`` and
    ``memory`` are ignored (the hub adds its own, such as ``_xsrf``).
    """
    groups = frozenset(groups)
    visible = visible_profiles(pset, groups)
    custom = visible_custom(pset, groups)
    offered = [p.slug for p in visible] + ([CUSTOM_SLUG] if custom else [])
    slug = _field(form, "profile") or ""
    if not slug:
        if visible:
            return visible[0]
        if custom is None:
            raise ProfileError("no server profile is open to your groups; ask an admin for access")
        slug = CUSTOM_SLUG
    if slug == CUSTOM_SLUG and custom is not None:
        return _resolve_custom(custom, form)
    for profile in visible:
        if profile.slug == slug:
            return profile
    # The same words for a profile that does not exist and one that is not the user's.
    raise ProfileError(
        f"no profile {_short(slug)} for you; choose one of: {', '.join(offered) or 'none'}"
    )


def _resolve_custom(custom: CustomChoices, form: Mapping[str, Any]) -> Profile:
    image: str | None
    text = _field(form, "image")
    if not text:
        if custom.images:
            image = custom.images[0]
        elif custom.free_image:
            raise ProfileError(f"custom profile: give an image like {IMAGE_FORMS}")
        else:
            image = None
    elif text in custom.images:
        image = text
    elif custom.free_image:
        if not IMAGE_RE.fullmatch(text):
            raise ProfileError(f"custom profile: image {_short(text)} must look like {IMAGE_FORMS}")
        image = text
    else:
        listed = ", ".join(custom.images) or "the hub's default"
        raise ProfileError(
            f"custom profile: image {_short(text)} is not offered; choose one of: {listed}"
        )

    gpus, slices = _gpu_choice(custom, form)
    cpus = _number_choice(form, "cpus", custom.cpus)
    memory = _memory_choice(form, custom.memory)
    parts = [f"{format_cpus(cpus)} CPUs", describe_memory(memory)]
    if gpus:
        parts.append(f"{gpus} GPU(s)")
    if slices:
        parts.append(f"{slices} GPU slice(s)")
    return Profile(
        slug=CUSTOM_SLUG,
        display_name=f"{custom.display_name}: {', '.join(parts)}",
        description=image or "",
        cpu_limit=cpus,
        cpu_guarantee=cpus,
        mem_limit=memory,
        mem_guarantee=memory,
        gpus=gpus,
        slices=slices,
        image=image,
        groups=custom.groups,
    )


def _gpu_choice(custom: CustomChoices, form: Mapping[str, Any]) -> tuple[int, int]:
    """The (whole GPUs, slices) a form picks: field ``gpu`` (``none``, ``gpus-N``,
    ``slices-K``), or fields ``gpus`` and ``slices``; the first offered choice if none."""
    offered = custom.gpu_options
    listed = ", ".join(gpu_choice_key(*choice) for choice in offered)
    key = _field(form, "gpu")
    gpus_text, slices_text = _field(form, "gpus"), _field(form, "slices")
    if key and (gpus_text or slices_text):
        raise ProfileError("custom profile: give the GPU choice once (gpu, or gpus and slices)")
    if key:
        match = re.fullmatch(r"none|(gpus|slices)-(\d{1,3})", key)
        if match is None:
            raise ProfileError(
                f"custom profile: GPU choice {_short(key)} is not offered; choose one of: {listed}"
            )
        count = int(match.group(2) or 0)
        choice = (count, 0) if match.group(1) == "gpus" else (0, count)
    elif gpus_text or slices_text:
        values = []
        for name, text in (("gpus", gpus_text), ("slices", slices_text)):
            if text and not re.fullmatch(r"\d{1,3}", text):
                raise ProfileError(f"custom profile: {name} {_short(text)} is not a whole number")
            values.append(int(text) if text else 0)
        if values[0] and values[1]:
            raise ProfileError(
                f"custom profile: {values[0]} whole GPU(s) and {values[1]} slice(s) exclude "
                "each other; choose whole GPUs or slices"
            )
        choice = (values[0], values[1])
    else:
        return offered[0]
    if choice not in offered:
        raise ProfileError(
            f"custom profile: GPU choice {gpu_choice_key(*choice)!r} is not offered; "
            f"choose one of: {listed}"
        )
    return choice


def _join(values: Iterable[Any]) -> str:
    return ", ".join(format_cpus(v) if isinstance(v, float) else str(v) for v in values)


def _number_choice(form: Mapping[str, Any], name: str, allowed: Sequence[float]) -> float:
    text = _field(form, name)
    if not text:
        return allowed[0]
    for value in allowed:
        if text == format_cpus(value):
            return value
    try:
        number = float(text) if re.fullmatch(r"\d{1,5}(\.\d{1,6})?", text) else math.nan
    except ValueError:
        number = math.nan
    if number in allowed:
        return number
    raise ProfileError(
        f"custom profile: CPUs {_short(text)} is not offered; choose one of: {_join(allowed)}"
    )


def _memory_choice(form: Mapping[str, Any], allowed: Sequence[int]) -> int:
    text = _field(form, "memory")
    if not text:
        return allowed[0]
    try:
        size = parse_memory(text, "memory")
    except ProfileError:
        size = -1
    if size in allowed:
        return size
    listed = ", ".join(format_memory(m) for m in allowed)
    raise ProfileError(
        f"custom profile: memory {_short(text)} is not offered; choose one of: {listed}"
    )


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
    if fraction is None:
        return {}
    if pset.gpu_memory is None:
        raise ProfileError(
            f"profile {profile.slug!r} uses GPU slices but [gpu] memory is not set; "
            'give the memory of one GPU, such as "32G"'
        )
    return {
        "GPULANE_GPU_MEMORY_LIMIT": str(int(pset.gpu_memory * fraction)),
        "GPULANE_GPU_MEMORY_FRACTION": f"{fraction:.4f}",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.4f}",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }


# ---------------------------------------------------------------------------- the spawn form


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


def options_form_html(
    profiles: list[Profile], custom: CustomChoices | None, pset: ProfileSet | None = None
) -> str:
    """The spawn form: one radio button per profile, then the custom profile's fields.

    Every text is HTML-escaped; the posted form is checked again by :func:`resolve_form`.
    """
    esc = html.escape
    if not profiles and custom is None:
        return "<p>No server profile is open to your groups; ask an admin for access.</p>"
    lines = ['<div class="gpulane-profiles">']
    for index, profile in enumerate(profiles):
        checked = " checked" if index == 0 else ""
        lines.append(
            f'<div class="radio"><label><input type="radio" name="profile" '
            f'value="{esc(profile.slug)}"{checked}> <strong>{esc(profile.display_name)}</strong>'
            f" <small>{esc(describe_profile(profile, pset))}</small>"
            + (f"<br><span>{esc(profile.description)}</span>" if profile.description else "")
            + "</label></div>"
        )
    if custom is not None:
        checked = "" if profiles else " checked"
        lines.append(
            f'<div class="radio"><label><input type="radio" name="profile" value="{CUSTOM_SLUG}"'
            f"{checked}> <strong>{esc(custom.display_name)}</strong>"
            + (f"<br><span>{esc(custom.description)}</span>" if custom.description else "")
            + "</label></div>"
        )
        lines.append('<fieldset class="gpulane-custom">')
        if custom.free_image:
            lines.append(
                '<label>Image <input class="form-control" name="image" list="gpulane-images" '
                f'pattern="{esc(IMAGE_PATTERN)}" title="{esc(IMAGE_FORMS)}" '
                f'placeholder="registry/name:tag" value="{esc(custom.images[0]) if custom.images else ""}">'
                "</label>"
            )
            lines.append(
                '<datalist id="gpulane-images">'
                + "".join(f'<option value="{esc(i)}">' for i in custom.images)
                + "</datalist>"
            )
        elif custom.images:
            lines.append(_select("image", "Image", [(i, i) for i in custom.images]))
        if custom.gpu_options != ((0, 0),):
            lines.append(
                _select(
                    "gpu",
                    "GPU",
                    [(gpu_choice_key(*c), gpu_choice_label(*c, pset)) for c in custom.gpu_options],
                )
            )
        lines.append(
            _select("cpus", "CPUs", [(format_cpus(c), format_cpus(c)) for c in custom.cpus])
        )
        lines.append(
            _select(
                "memory", "Memory", [(format_memory(m), describe_memory(m)) for m in custom.memory]
            )
        )
        lines.append("</fieldset>")
    lines.append("</div>")
    return "\n".join(lines)


def _select(name: str, label: str, options: list[tuple[str, str]]) -> str:
    esc = html.escape
    items = "".join(f'<option value="{esc(value)}">{esc(text)}</option>' for value, text in options)
    return f'<label>{esc(label)} <select class="form-control" name="{esc(name)}">{items}</select></label>'
