"""The profile file rendered for KubeSpawner (JupyterHub on Kubernetes).

In the hub's configuration (``hub.extraConfig`` of the zero-to-jupyterhub chart;
``gpulane k8s hub-values`` writes it)::

    from gpulane.hub.kube import configure_kubespawner
    configure_kubespawner(c, "/etc/gpulane/profiles.toml")

That loads and validates the file when the hub starts (a mistake stops the hub with
one line naming it), then sets on KubeSpawner:

- ``profile_list``: a callable that gives each user only the profiles their hub
  groups allow, each with a ``kubespawner_override`` for CPU, memory, image, the
  GPU resource (``nvidia.com/gpu``) and, for slices, the GPU memory caps;
- ``options_from_form``: the posted form is user input, checked against the
  user's groups and the custom profile's lists before anything is saved; a
  refusal is shown on the spawn page;
- ``pre_spawn_hook``: the same check for options that did not come through the
  form (the REST API, options saved from an earlier spawn).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gpulane.config import GPU_MEMORY_FRACTION_ENV, GPU_MEMORY_LIMIT_ENV, PROFILE_ENV
from gpulane.profiles import (
    CUSTOM_SLUG,
    IMAGE_FORMS,
    IMAGE_PATTERN,
    CustomChoices,
    Profile,
    ProfileError,
    ProfileSet,
    describe_memory,
    describe_profile,
    format_cpus,
    format_memory,
    gpu_choice_key,
    gpu_choice_label,
    gpu_environment,
    load_profiles_file,
    resolve_form,
    visible_custom,
    visible_profiles,
)

GPU_RESOURCE = "nvidia.com/gpu"
# Variables a profile sets or clears; cleared ones are None (KubeSpawner drops the key).
_CAP_VARIABLES = (
    GPU_MEMORY_LIMIT_ENV,
    GPU_MEMORY_FRACTION_ENV,
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "TF_FORCE_GPU_ALLOW_GROWTH",
)
GPU_WAIT_MESSAGE = (
    "Waiting for a GPU for {seconds} s: every GPU (or slice) may be in use. "
    "Your server starts as soon as one is free; idle servers are stopped to free theirs."
)

UserOptions = dict[str, Any]


# ---------------------------------------------------------------------------- overrides


def gpu_override(gpus: int, slices: int, pset: ProfileSet) -> dict[str, Any]:
    """The resource and environment part of an override for whole GPUs, slices or none."""
    resources: dict[str, str | None] = {GPU_RESOURCE: None, pset.slice_resource: None}
    environment: dict[str, str | None] = dict.fromkeys(_CAP_VARIABLES)
    probe = Profile(CUSTOM_SLUG, "", "", None, None, None, None, gpus, slices, None, frozenset())
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
        environment["NVIDIA_VISIBLE_DEVICES"] = None
    elif slices:
        resources[pset.slice_resource] = str(slices)
        environment["NVIDIA_VISIBLE_DEVICES"] = None
        environment.update(gpu_environment(probe, pset))
    else:
        # A CUDA base image asks the NVIDIA runtime for every GPU; a CPU profile must not
        # see them (the device plugin sets this variable itself for pods that get GPUs).
        environment["NVIDIA_VISIBLE_DEVICES"] = "void"
    override: dict[str, Any] = {
        "extra_resource_limits": dict(resources),
        "extra_resource_guarantees": dict(resources),
        "environment": environment,
    }
    if gpus or slices:
        override["slow_spawn_message"] = GPU_WAIT_MESSAGE
    return override


def kubespawner_override(profile: Profile, pset: ProfileSet) -> dict[str, Any]:
    """KubeSpawner settings for one profile (values left out keep the hub's defaults)."""
    override: dict[str, Any] = {}
    if profile.cpu_limit is not None:
        override["cpu_limit"] = profile.cpu_limit
    if profile.cpu_guarantee is not None:
        override["cpu_guarantee"] = profile.cpu_guarantee
    if profile.mem_limit is not None:
        override["mem_limit"] = profile.mem_limit
    if profile.mem_guarantee is not None:
        override["mem_guarantee"] = profile.mem_guarantee
    if profile.image is not None:
        override["image"] = profile.image
    override.update(gpu_override(profile.gpus, profile.slices, pset))
    override["environment"][PROFILE_ENV] = profile.slug
    return override


def kubespawner_profile(profile: Profile, pset: ProfileSet, default: bool) -> dict[str, Any]:
    """One entry of KubeSpawner's profile_list (its form template does not escape: we do)."""
    description = describe_profile(profile, pset)
    if profile.description:
        description = f"{profile.description} ({description})"
    return {
        "slug": profile.slug,
        "display_name": html.escape(profile.display_name),
        "description": html.escape(description),
        "default": default,
        "kubespawner_override": kubespawner_override(profile, pset),
    }


def kubespawner_custom(custom: CustomChoices, pset: ProfileSet, default: bool) -> dict[str, Any]:
    """The custom profile as KubeSpawner profile_options: every choice from a bounded list."""
    options: dict[str, Any] = {}
    if custom.images or custom.free_image:
        image: dict[str, Any] = {
            "display_name": "Image",
            "choices": {
                i: {"display_name": html.escape(i), "kubespawner_override": {"image": i}}
                for i in custom.images
            },
        }
        if custom.free_image:
            image["unlisted_choice"] = {
                "enabled": True,
                "display_name": "Image (registry/name:tag)",
                "display_name_in_choices": "Another image...",
                "validation_regex": IMAGE_PATTERN,
                "validation_message": html.escape(f"Must look like {IMAGE_FORMS}"),
                "kubespawner_override": {"image": "{value}"},
            }
        options["image"] = image
    gpu_choices = {
        gpu_choice_key(gpus, slices): {
            "display_name": html.escape(gpu_choice_label(gpus, slices, pset)),
            "kubespawner_override": gpu_override(gpus, slices, pset),
        }
        for gpus, slices in custom.gpu_options
    }
    options["gpu"] = {"display_name": "GPU", "choices": gpu_choices}
    options["cpus"] = {
        "display_name": "CPUs",
        "choices": {
            format_cpus(c): {
                "display_name": format_cpus(c),
                "kubespawner_override": {"cpu_limit": c, "cpu_guarantee": c},
            }
            for c in custom.cpus
        },
    }
    options["memory"] = {
        "display_name": "Memory",
        "choices": {
            format_memory(m): {
                "display_name": describe_memory(m),
                "kubespawner_override": {"mem_limit": m, "mem_guarantee": m},
            }
            for m in custom.memory
        },
    }
    return {
        "slug": CUSTOM_SLUG,
        "display_name": html.escape(custom.display_name),
        "description": html.escape(custom.description),
        "default": default,
        "kubespawner_override": {"environment": {PROFILE_ENV: CUSTOM_SLUG}},
        "profile_options": options,
    }


def profile_list_for(pset: ProfileSet, groups: Iterable[str]) -> list[dict[str, Any]]:
    """KubeSpawner's profile_list for a user in ``groups``: only what those groups allow."""
    groups = frozenset(groups)
    entries = [
        kubespawner_profile(p, pset, default=index == 0)
        for index, p in enumerate(visible_profiles(pset, groups))
    ]
    custom = visible_custom(pset, groups)
    if custom is not None:
        entries.append(kubespawner_custom(custom, pset, default=not entries))
    return entries


# ---------------------------------------------------------------------------- checking options


def user_groups(spawner: Any) -> list[str]:
    """The hub groups of the spawner's user (from the identity provider with manage_groups)."""
    return sorted(group.name for group in spawner.user.groups)


def form_from_user_options(user_options: Mapping[str, Any]) -> dict[str, list[str]]:
    """KubeSpawner's user_options (``profile``, ``image``, ``gpu``...) as gpulane form fields."""

    def text(key: str) -> str:
        value = user_options.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ProfileError(f"the option {key!r} must be text")
        return value

    slug = text("profile")
    form: dict[str, list[str]] = {"profile": [slug]}
    if slug != CUSTOM_SLUG:
        return form
    unlisted = text("image--unlisted-choice")
    image = unlisted or text("image")
    if image:
        form["image"] = [image]
    if text("gpu"):
        form["gpu"] = [text("gpu")]
    for key in ("cpus", "memory"):
        if text(key):
            form[key] = [text(key)]
    return form


def check_user_options(
    pset: ProfileSet, groups: Iterable[str], user_options: Mapping[str, Any] | None
) -> Profile:
    """The profile these options select, or a :class:`ProfileError` saying why not.

    Checks what the user's groups allow (:func:`resolve_form`) and, for the custom
    profile, that every choice is one KubeSpawner's profile_options hold, word for word.
    """
    if user_options is not None and not isinstance(user_options, Mapping):
        raise ProfileError("the server options must be a JSON object")
    options = dict(user_options or {})
    profile = resolve_form(pset, groups, form_from_user_options(options))
    if profile.slug == CUSTOM_SLUG and pset.custom is not None:
        entry = kubespawner_custom(pset.custom, pset, default=False)
        for key, option in entry["profile_options"].items():
            unlisted = options.get(f"{key}--unlisted-choice")
            if unlisted and not option.get("unlisted_choice", {}).get("enabled"):
                raise ProfileError(f"custom profile: {key} must be chosen from the list")
            value = options.get(key)
            if value and not unlisted and value not in option["choices"]:
                listed = ", ".join(option["choices"])
                raise ProfileError(
                    f"custom profile: {key} {str(value)[:60]!r} is not offered; "
                    f"choose one of: {listed}"
                )
    return profile


def kubespawner_options_from_form(formdata: Mapping[str, list[str]]) -> UserOptions:
    """KubeSpawner's reading of its form: ``profile`` plus that profile's ``profile-option-*``."""
    values = formdata.get("profile") or [""]
    slug = values[0] if isinstance(values, list | tuple) and values else ""
    options: UserOptions = {}
    if slug:
        options["profile"] = slug
        prefix = f"profile-option-{slug}--"
        for key, value in formdata.items():
            if key.startswith(prefix) and isinstance(value, list | tuple) and value:
                options[key[len(prefix) :]] = value[0]
    return options


def make_profile_list(pset: ProfileSet) -> Callable[[Any], list[dict[str, Any]]]:
    """``c.KubeSpawner.profile_list``: the profiles of the spawner's user's groups."""

    def profile_list(spawner: Any) -> list[dict[str, Any]]:
        return profile_list_for(pset, user_groups(spawner))

    return profile_list


def make_options_from_form(pset: ProfileSet) -> Callable[..., UserOptions]:
    """``c.KubeSpawner.options_from_form``: refuse what the user may not have, on the server."""

    def options_from_form(formdata: Mapping[str, list[str]], spawner: Any) -> UserOptions:
        options = kubespawner_options_from_form(formdata)
        check_user_options(pset, user_groups(spawner), options)
        return options

    return options_from_form


def make_pre_spawn_hook(
    pset: ProfileSet, previous: Callable[[Any], Any] | None = None
) -> Callable[[Any], Any]:
    """``c.KubeSpawner.pre_spawn_hook``: the same check for options from the REST API."""

    async def pre_spawn_hook(spawner: Any) -> None:
        profile = check_user_options(pset, user_groups(spawner), spawner.user_options)
        spawner.log.info(
            "gpulane: %s starts profile %s (%s)",
            spawner.user.name,
            profile.slug,
            describe_profile(profile, pset),
        )
        if previous is not None:
            result = previous(spawner)
            if hasattr(result, "__await__"):
                await result

    return pre_spawn_hook


def check_for_kubernetes(pset: ProfileSet) -> None:
    """Refuse whole GPUs that Kubernetes would hand out as slices.

    With time-slicing on, every unit of ``nvidia.com/gpu`` is one slice: a profile
    asking for "1 whole GPU" would get a slice. Whole GPUs then need the slices
    renamed (``time-slicing --rename-shared``, ``slice_resource = nvidia.com/gpu.shared``).
    Refuse ``gpu_mem`` too: only the broker places by memory; a pod would get no GPU.
    """
    by_memory = [p.slug for p in pset.profiles if p.gpu_mem is not None]
    if by_memory:
        raise ProfileError(
            f"profile(s) {', '.join(by_memory)} ask for gpu_mem, which only gpulane's broker "
            "on one machine places; on Kubernetes give gpus or slices"
        )
    if pset.slices_per_gpu < 2 or pset.slice_resource != GPU_RESOURCE:
        return
    whole = [p.slug for p in pset.profiles if p.gpus]
    if pset.custom is not None and any(pset.custom.gpus):
        whole.append(CUSTOM_SLUG)
    if whole:
        raise ProfileError(
            f"profile(s) {', '.join(whole)} ask for whole GPUs, but with slices_per_gpu = "
            f"{pset.slices_per_gpu} every {GPU_RESOURCE} on Kubernetes is one slice; set [gpu] "
            'slice_resource = "nvidia.com/gpu.shared" and run gpulane k8s time-slicing '
            "with --rename-shared, or offer slices only"
        )


def configure_kubespawner(c: Any, profiles_file: str) -> ProfileSet:
    """Load ``profiles_file`` now (a mistake stops the hub, named) and set up KubeSpawner."""
    pset = load_profiles_file(profiles_file)
    check_for_kubernetes(pset)
    section = c.KubeSpawner
    previous = section.get("pre_spawn_hook") if "pre_spawn_hook" in section else None
    section.profile_list = make_profile_list(pset)
    section.options_from_form = make_options_from_form(pset)
    section.pre_spawn_hook = make_pre_spawn_hook(pset, previous if callable(previous) else None)
    return pset
