"""The profile file: validated at start-up with one-line errors; the spawn form checked on the server."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulane.hub.forms import options_form_html
from gpulane.profiles import (
    IMAGE_PATTERN,
    IMAGE_RE,
    CustomChoices,
    Profile,
    ProfileError,
    ProfileSet,
    describe_profile,
    gpu_environment,
    load_profiles,
    load_profiles_file,
    resolve_form,
    visible_custom,
    visible_profiles,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "profiles.toml"
GIB = 1024**3
PYTORCH = "quay.io/jupyter/pytorch-notebook:cuda12-2024-12-02"


def base() -> dict[str, Any]:
    """A small valid configuration the error tests spoil one field at a time."""
    return {
        "gpu": {"slices_per_gpu": 4, "memory": "32G"},
        "profile": [
            {"slug": "cpu", "display_name": "CPU", "cpu_limit": 2, "mem_limit": "4G"},
            {
                "slug": "slice",
                "display_name": "A slice",
                "slices": 1,
                "groups": ["gpu"],
                "default": True,
            },
            {"slug": "secret", "display_name": "Admins only", "gpus": 1, "groups": ["admins"]},
        ],
        "custom": {
            "groups": ["hpc"],
            "images": [PYTORCH],
            "free_image": True,
            "gpus": [0, 1],
            "slices": [1, 2],
            "cpus": [2, 4.5],
            "memory": ["8G", "16G"],
        },
    }


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ProfileError) as error:
        load_profiles(data)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    return message


def form(**fields: str) -> dict[str, list[str]]:
    return {key: [value] for key, value in fields.items()}


# ---------------------------------------------------------------------------- loading


def test_example_file_loads_and_matches_its_comments() -> None:
    pset = load_profiles_file(EXAMPLE)
    assert [p.slug for p in pset.profiles] == ["cpu", "gpu-slice", "gpu-half"]
    assert pset.slices_per_gpu == 4 and pset.gpu_memory == 32 * GIB
    cpu = pset.profile("cpu")
    assert cpu is not None and cpu.default and not cpu.uses_gpu
    assert cpu.cpu_limit == 2.0 and cpu.cpu_guarantee == 0.5
    assert cpu.mem_limit == 4 * GIB and cpu.mem_guarantee == GIB
    half = pset.profile("gpu-half")
    assert half is not None and half.slices == 2 and half.groups == {"hpc"}
    assert pset.custom is not None and pset.custom.free_image
    assert pset.custom.memory == (8 * GIB, 16 * GIB, 32 * GIB)


def test_valid_base_loads() -> None:
    pset = load_profiles(base())
    secret = pset.profile("secret")
    assert secret is not None and secret.gpus == 1 and secret.uses_gpu
    assert pset.custom is not None and pset.custom.cpus == (2.0, 4.5)


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda d: d.update(gpus={}), r"unknown key\(s\) gpus; known keys: custom, gpu, profile"),
        (lambda d: d["gpu"].update(memroy="8G"), r"\[gpu\]: unknown key\(s\) memroy"),
        (lambda d: d["profile"][0].update(cpus=2), r"profile 'cpu': unknown key\(s\) cpus"),
        (lambda d: d["custom"].update(image="x"), r"\[custom\]: unknown key\(s\) image"),
        (
            lambda d: d["profile"][0].update(cpu_guarantee=3),
            r"profile 'cpu': cpu_guarantee 3 is above cpu_limit 2",
        ),
        (
            lambda d: d["profile"][0].update(mem_guarantee="8G"),
            r"profile 'cpu': mem_guarantee 8G is above mem_limit 4G",
        ),
        (
            lambda d: d["profile"][0].update(mem_limit="4 gigs"),
            r"profile 'cpu': mem_limit '4 gigs' is not a size; use a size such as 512M",
        ),
        (lambda d: d["profile"][0].update(cpu_limit=True), r"cpu_limit True must be a number"),
        (lambda d: d["profile"][0].update(cpu_limit=0), r"cpu_limit 0 must be from 0.01 to"),
        (
            lambda d: d["profile"][1].update(gpus=1),
            r"profile 'slice': gpus = 1 and slices = 1 exclude each other",
        ),
        (
            lambda d: d["profile"][1].update(slices=5),
            r"profile 'slice': slices = 5 is more than a GPU has: use 1 to 4",
        ),
        (lambda d: d["gpu"].pop("memory"), r"slices = 1 needs \[gpu\] memory"),
        (
            lambda d: d["gpu"].update(slices_per_gpu=1),
            r"profile 'slice': slices = 1 needs \[gpu\] slices_per_gpu of 2 or more",
        ),
        (
            lambda d: d["gpu"].update(slices_per_gpu=0),
            r"slices_per_gpu 0 must be a whole number from 1",
        ),
        (
            lambda d: d["profile"][0].update(image="jupyter/scipy-notebook"),
            r"profile 'cpu': image 'jupyter/scipy-notebook' must look like registry/name:tag",
        ),
        (lambda d: d["profile"][0].update(slug="CPU"), r"profile #1: slug 'CPU' must be 1-40"),
        (lambda d: d["profile"][0].update(slug="custom"), r"'custom' is kept for the \[custom\]"),
        (lambda d: d["profile"][1].update(slug="cpu"), r"profile 'cpu' is defined twice"),
        (lambda d: d["profile"][0].update(default=True), r"'cpu', 'slice' all say default = true"),
        (lambda d: d["profile"][0].update(default="yes"), r"default must be true or false"),
        (lambda d: d["profile"][0].update(groups="gpu"), r"groups must be a list of group names"),
        (
            lambda d: d["custom"].update(gpus=[0, 65]),
            r"\[custom\] gpus: 65 must be a whole number from 0 to 64",
        ),
        (lambda d: d["custom"].update(slices=[8]), r"\[custom\] slices = 8 is more than a GPU has"),
        (lambda d: d["custom"].update(cpus=[2, 2]), r"\[custom\] cpus lists a value twice"),
        (lambda d: d["custom"].pop("memory"), r"\[custom\] needs cpus and memory lists"),
        (
            lambda d: d["custom"].update(images=["ubuntu"]),
            r"\[custom\] images: 'ubuntu' must look like",
        ),
        (
            lambda d: d["gpu"].update(slice_resource="gpu"),
            r"slice_resource 'gpu' must be a Kubernetes",
        ),
        (lambda d: (d.pop("profile"), d.pop("custom")), r"no profiles: add at least one"),
    ],
)
def test_mistakes_are_refused_in_one_line_naming_the_field(spoil: Any, expected: str) -> None:
    data = base()
    spoil(data)
    assert re.search(expected, refused(data))


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "profiles.toml"
    broken.write_text('[gpu]\nslices_per_gpu = "four"\n')
    with pytest.raises(ProfileError, match=r"profiles.toml: \[gpu\] slices_per_gpu 'four'"):
        load_profiles_file(broken)
    broken.write_text("[[profile]\nslug = 'x'\n")
    with pytest.raises(ProfileError, match=r"profiles.toml is not valid TOML"):
        load_profiles_file(broken)
    with pytest.raises(ProfileError, match=r"cannot read the profile file .*missing.toml"):
        load_profiles_file(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "image",
    [
        "quay.io/jupyter/scipy-notebook:2024-12-02",
        "docker.io/library/python:3.12-slim",
        "nvcr.io/nvidia/pytorch:24.10-py3",
        "localhost:5000/team/notebook:v1.0",
        "registry.example.org:8443/a/b/c:latest",
        "ghcr.io/org/img:tag@sha256:" + "a" * 64,
    ],
)
def test_images_that_look_like_registry_name_tag(image: str) -> None:
    assert IMAGE_RE.fullmatch(image)


@pytest.mark.parametrize(
    "image",
    [
        "jupyter/scipy-notebook:latest",  # no registry: which one would it be?
        "quay.io/jupyter/scipy-notebook",  # no tag
        "quay.io/Jupyter/scipy:1",  # upper case name
        "quay.io/jupyter/scipy:1 ; rm -rf /",
        "quay.io/../etc:1",
        "quay.io/jupyter/scipy:1\n",
        "",
    ],
)
def test_images_refused(image: str) -> None:
    assert not IMAGE_RE.fullmatch(image)


# ---------------------------------------------------------------------------- who sees what


def test_users_see_only_their_groups_profiles_default_first() -> None:
    pset = load_profiles(base())
    assert [p.slug for p in visible_profiles(pset, [])] == ["cpu"]
    assert [p.slug for p in visible_profiles(pset, ["gpu"])] == ["slice", "cpu"]
    assert [p.slug for p in visible_profiles(pset, {"gpu", "admins"})] == ["slice", "cpu", "secret"]
    assert visible_custom(pset, ["gpu"]) is None
    assert visible_custom(pset, ["hpc"]) is pset.custom


def test_form_picks_default_and_allowed_profiles() -> None:
    pset = load_profiles(base())
    assert resolve_form(pset, ["gpu"], {}).slug == "slice"
    assert resolve_form(pset, [], {"_xsrf": ["token"]}).slug == "cpu"
    assert resolve_form(pset, ["gpu"], form(profile="cpu")).slug == "cpu"
    # Custom fields posted along with another profile are not looked at.
    chosen = resolve_form(pset, ["gpu"], form(profile="slice", gpu="gpus-8", image="bad"))
    assert chosen.slug == "slice"


def test_forged_profile_is_refused_like_a_missing_one() -> None:
    pset = load_profiles(base())
    with pytest.raises(ProfileError) as hidden:
        resolve_form(pset, ["gpu"], form(profile="secret"))
    with pytest.raises(ProfileError) as missing:
        resolve_form(pset, ["gpu"], form(profile="nonesuch"))
    assert str(hidden.value) == "no profile 'secret' for you; choose one of: slice, cpu"
    assert str(missing.value).replace("nonesuch", "secret") == str(hidden.value)
    with pytest.raises(ProfileError, match="no profile 'custom' for you"):
        resolve_form(pset, ["gpu"], form(profile="custom"))


def test_custom_profile_values_come_from_its_lists() -> None:
    pset = load_profiles(base())
    chosen = resolve_form(
        pset, ["hpc"], form(profile="custom", gpu="slices-2", cpus="4.5", memory="16G")
    )
    assert (chosen.slug, chosen.slices, chosen.gpus) == ("custom", 2, 0)
    assert chosen.cpu_limit == chosen.cpu_guarantee == 4.5
    assert chosen.mem_limit == 16 * GIB and chosen.image == PYTORCH
    defaults = resolve_form(pset, ["hpc"], form(profile="custom"))
    assert (defaults.gpus, defaults.slices, defaults.cpu_limit, defaults.mem_limit) == (
        0,
        0,
        2.0,
        8 * GIB,
    )
    free = resolve_form(
        pset, ["hpc"], form(profile="custom", image="docker.io/library/python:3.12")
    )
    assert free.image == "docker.io/library/python:3.12"
    # The older field names work too.
    assert resolve_form(pset, ["hpc"], form(profile="custom", gpus="1")).gpus == 1
    assert resolve_form(pset, ["hpc"], form(profile="custom", slices="1", gpus="0")).slices == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"gpu": "gpus-8"},
            "GPU choice 'gpus-8' is not offered; choose one of: none, gpus-1, slices-1, slices-2",
        ),
        ({"gpu": "slices-3"}, "GPU choice 'slices-3' is not offered"),
        ({"gpu": "lots"}, "GPU choice 'lots' is not offered"),
        ({"gpus": "1", "slices": "1"}, "1 whole GPU(s) and 1 slice(s) exclude each other"),
        ({"gpu": "none", "gpus": "1"}, "give the GPU choice once"),
        ({"gpus": "-1"}, "gpus '-1' is not a whole number"),
        ({"cpus": "64"}, "CPUs '64' is not offered; choose one of: 2, 4.5"),
        ({"cpus": "nan"}, "CPUs 'nan' is not offered"),
        ({"memory": "1T"}, "memory '1T' is not offered; choose one of: 8G, 16G"),
        ({"image": "ubuntu:latest"}, "image 'ubuntu:latest' must look like registry/name:tag"),
        ({"image": "x" * 400}, "the form field 'image' is longer than 300 characters"),
    ],
)
def test_tampered_custom_values_are_refused(fields: dict[str, str], expected: str) -> None:
    pset = load_profiles(base())
    with pytest.raises(ProfileError) as error:
        resolve_form(pset, ["hpc"], form(profile="custom", **fields))
    assert expected in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_listed_images_only_unless_free_text_is_allowed() -> None:
    data = base()
    data["custom"]["free_image"] = False
    pset = load_profiles(data)
    with pytest.raises(
        ProfileError,
        match=r"image 'docker.io/library/python:3.12' is not offered; choose one of: quay.io",
    ):
        resolve_form(pset, ["hpc"], form(profile="custom", image="docker.io/library/python:3.12"))
    assert resolve_form(pset, ["hpc"], form(profile="custom", image=PYTORCH)).image == PYTORCH


def test_a_field_given_twice_is_refused() -> None:
    pset = load_profiles(base())
    with pytest.raises(ProfileError, match="'profile' must be given once"):
        resolve_form(pset, ["gpu", "admins"], {"profile": ["cpu", "secret"]})


def test_no_profile_for_anyone_outside_the_groups() -> None:
    data = base()
    data["profile"] = [p for p in data["profile"] if p.get("groups")]
    pset = load_profiles(data)
    with pytest.raises(ProfileError, match="no server profile is open to your groups"):
        resolve_form(pset, ["students"], {})


GROUPS = st.sets(st.sampled_from(["gpu", "hpc", "admins", "students"]), max_size=3)
FIELDS = st.sampled_from(["profile", "image", "gpu", "gpus", "slices", "cpus", "memory", "_xsrf"])
VALUES = st.one_of(
    st.sampled_from(
        ["cpu", "slice", "secret", "custom", "none", "gpus-1", "slices-2", "8G", "2", "0"]
    ),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(groups=GROUPS, posted=st.dictionaries(FIELDS, st.lists(VALUES, min_size=1, max_size=2)))
def test_any_form_gives_an_allowed_profile_or_a_profile_error(
    groups: set[str], posted: dict[str, list[str]]
) -> None:
    pset = load_profiles(base())
    try:
        chosen = resolve_form(pset, groups, posted)
    except ProfileError as error:
        assert len(str(error).splitlines()) == 1
        return
    if chosen.slug == "custom":
        custom = pset.custom
        assert custom is not None and custom.open_to(groups)
        assert (chosen.gpus, chosen.slices) in custom.gpu_options
        assert chosen.cpu_limit in custom.cpus and chosen.mem_limit in custom.memory
        assert chosen.image is not None and IMAGE_RE.fullmatch(chosen.image)
    else:
        assert chosen in visible_profiles(pset, groups)


# ---------------------------------------------------------------------------- GPU memory shares


def test_slices_get_their_share_of_gpu_memory() -> None:
    pset = load_profiles(base())
    one = pset.profile("slice")
    assert one is not None
    assert gpu_environment(one, pset) == {
        "GPULANE_GPU_MEMORY_LIMIT": str(8 * GIB),
        "GPULANE_GPU_MEMORY_FRACTION": "0.2500",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2500",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }
    for slug in ("cpu", "secret"):
        profile = pset.profile(slug)
        assert profile is not None and gpu_environment(profile, pset) == {}
    two = resolve_form(pset, ["hpc"], form(profile="custom", gpu="slices-2"))
    assert gpu_environment(two, pset)["GPULANE_GPU_MEMORY_LIMIT"] == str(16 * GIB)


def test_slices_without_gpu_memory_cannot_be_capped() -> None:
    profile = Profile("s", "S", "", None, None, None, None, 0, 1, None, frozenset())
    with pytest.raises(ProfileError, match=r"\[gpu\] memory is not set"):
        gpu_environment(profile, ProfileSet((profile,), None, slices_per_gpu=2))


# ---------------------------------------------------------------------------- the form


def test_form_lists_only_visible_profiles_escaped() -> None:
    data = base()
    data["profile"][0]["display_name"] = "<script>alert(1)</script>"
    data["profile"][0]["description"] = 'say "hi" & bye'
    pset = load_profiles(data)
    page = options_form_html(visible_profiles(pset, ["gpu"]), visible_custom(pset, ["gpu"]), pset)
    assert "<script>" not in page and html.escape("<script>alert(1)</script>") in page
    assert html.escape('say "hi" & bye') in page
    assert 'value="slice" checked' in page and 'value="cpu"' in page
    assert 'value="secret"' not in page and 'value="custom"' not in page
    assert "1 of 4 slices of a GPU (8 GiB GPU memory)" in page


def test_form_has_the_custom_fields_for_its_groups() -> None:
    pset = load_profiles(base())
    page = options_form_html(visible_profiles(pset, ["hpc"]), visible_custom(pset, ["hpc"]), pset)
    for name in ("profile", "image", "gpu", "cpus", "memory"):
        assert f'name="{name}"' in page
    assert html.escape(IMAGE_PATTERN) in page
    for value in ("none", "gpus-1", "slices-1", "slices-2", "4.5", "16G"):
        assert f'value="{value}"' in page
    assert "No server profile" in options_form_html([], None)


def test_describe_profile() -> None:
    pset = load_profiles(base())
    cpu, secret = pset.profile("cpu"), pset.profile("secret")
    assert cpu is not None and secret is not None
    assert describe_profile(cpu, pset) == "2 CPUs · 4 GiB memory · no GPU"
    assert describe_profile(secret, pset) == "1 whole GPU"


def test_custom_choices_gpu_options_order() -> None:
    choices = CustomChoices(frozenset(), (), False, (1, 2), (1,), (2.0,), (GIB,))
    assert choices.gpu_options == ((1, 0), (2, 0), (0, 1))
