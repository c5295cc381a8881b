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

The parts: :mod:`~gpulane.profiles.model` (the frozen types and how values are
written), :mod:`~gpulane.profiles.loading` (reading and validating the file),
:mod:`~gpulane.profiles.selection` (what a user's groups allow; the posted form
checked again). The HTML spawn form is the hub's: :mod:`gpulane.hub.forms`;
KubeSpawner's ``profile_list`` is :mod:`gpulane.hub.kube`.
"""

from __future__ import annotations

from gpulane.profiles.loading import (
    MEMORY_FORMS,
    load_profiles,
    load_profiles_file,
    parse_profile_memory,
)
from gpulane.profiles.model import (
    CUSTOM_SLUG,
    DEFAULT_SLICE_RESOURCE,
    IMAGE_FORMS,
    IMAGE_PATTERN,
    IMAGE_RE,
    MAX_CHOICES,
    MAX_CPUS,
    MAX_FIELD_CHARS,
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
    describe_memory,
    describe_profile,
    format_cpus,
    format_memory,
    gpu_choice_key,
    gpu_choice_label,
    gpu_environment,
    slice_fraction,
)
from gpulane.profiles.selection import (
    resolve_form,
    visible_custom,
    visible_profiles,
)

__all__ = [
    "CUSTOM_SLUG",
    "DEFAULT_SLICE_RESOURCE",
    "IMAGE_FORMS",
    "IMAGE_PATTERN",
    "IMAGE_RE",
    "MAX_CHOICES",
    "MAX_CPUS",
    "MAX_FIELD_CHARS",
    "MAX_GPUS",
    "MAX_MEMORY",
    "MAX_SLICES_PER_GPU",
    "MEMORY_FORMS",
    "MIN_MEMORY",
    "RESOURCE_RE",
    "SLUG_RE",
    "CustomChoices",
    "Profile",
    "ProfileError",
    "ProfileSet",
    "describe_memory",
    "describe_profile",
    "format_cpus",
    "format_memory",
    "gpu_choice_key",
    "gpu_choice_label",
    "gpu_environment",
    "load_profiles",
    "load_profiles_file",
    "parse_profile_memory",
    "resolve_form",
    "slice_fraction",
    "visible_custom",
    "visible_profiles",
]
