"""What a user may start: the profiles their groups allow, and the spawn form checked again.

The spawn form is user input: :func:`resolve_form` takes JupyterHub's posted form
data and returns the :class:`~gpulane.profiles.model.Profile` it asks for, or a
one-line :class:`~gpulane.profiles.model.ProfileError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gpulane.profiles.loading import parse_profile_memory
from gpulane.profiles.model import (
    CUSTOM_SLUG,
    IMAGE_FORMS,
    IMAGE_RE,
    MAX_FIELD_CHARS,
    CustomChoices,
    Profile,
    ProfileError,
    ProfileSet,
    describe_memory,
    format_cpus,
    format_memory,
    gpu_choice_key,
)
from gpulane.profiles.model import short_repr as _short

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
        size = parse_profile_memory(text, "memory")
    except ProfileError:
        size = -1
    if size in allowed:
        return size
    listed = ", ".join(format_memory(m) for m in allowed)
    raise ProfileError(
        f"custom profile: memory {_short(text)} is not offered; choose one of: {listed}"
    )
