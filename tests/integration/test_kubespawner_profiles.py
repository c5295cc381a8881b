"""The profile file on real KubeSpawner objects: who sees what, what a profile sets, forged forms.

KubeSpawner is built the way its own tests build it (``_mock=True``, a stand-in user
with hub groups); it needs a kubeconfig to start, so an offline one points at a
closed port. Nothing here talks to a cluster: profile_list, options_from_form,
pre_spawn_hook, load_user_options and get_pod_manifest are local, and the pod they
produce is validated against the Kubernetes schema.
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gpulane.hub.kube import configure_kubespawner
from gpulane.profiles import IMAGE_PATTERN, ProfileError
from tests.support.users import need_module

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "profiles.toml"
GIB = 1024**3
PYTORCH = "quay.io/jupyter/pytorch-notebook:cuda12-2024-12-02"
K8S_VERSION = "1.30"
T = TypeVar("T")

OFFLINE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: offline
  cluster: {server: "https://127.0.0.1:9"}
users:
- name: nobody
  user: {token: not-a-token}
contexts:
- name: offline
  context: {cluster: offline, user: nobody}
current-context: offline
"""


class Group:
    def __init__(self, name: str) -> None:
        self.name = name


class User:
    """What KubeSpawner reads of a hub user: name, id, url, groups."""

    def __init__(self, name: str, groups: list[str]) -> None:
        self.name = name
        self.id = 7
        self.url = f"/user/{name}/"
        self.groups = [Group(g) for g in groups]


USERS = {"bob": [], "alice": ["gpu"], "carol": ["hpc"]}


@pytest.fixture(scope="module", autouse=True)
def offline_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    need_module("kubespawner")
    kube_config = need_module("kubernetes_asyncio.config.kube_config")
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(OFFLINE_KUBECONFIG)
    with pytest.MonkeyPatch.context() as patch:
        # Read once when kubernetes_asyncio is imported: set both.
        patch.setenv("KUBECONFIG", str(path))
        patch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        patch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield


def with_spawner(
    name: str, body: Callable[[Any], Awaitable[T]], groups: list[str] | None = None
) -> T:
    """Run ``body(spawner)`` in a loop (KubeSpawner's shared client needs one)."""
    from kubespawner import KubeSpawner
    from traitlets.config import Config

    async def main() -> T:
        config = Config()
        configure_kubespawner(config, str(EXAMPLE))
        spawner = KubeSpawner(
            config=config, user=User(name, USERS[name] if groups is None else groups), _mock=True
        )
        return await body(spawner)

    return asyncio.run(main())


async def spawn_pod(spawner: Any, formdata: dict[str, list[str]]) -> dict[str, Any]:
    """The path of a posted form: options_from_form, pre_spawn_hook, profile, pod manifest."""
    kubernetes_validate = need_module("kubernetes_validate")
    spawner.user_options = spawner.run_options_from_form(formdata)
    await spawner.run_pre_spawn_hook()
    await spawner.load_user_options()
    pod = spawner.api.api_client.sanitize_for_serialization(await spawner.get_pod_manifest())
    pod.update(apiVersion="v1", kind="Pod")
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    return pod


def container(pod: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = pod["spec"]["containers"][0]
    return first


def env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(pod)["env"]}


def slugs(spawner: Any) -> list[str]:
    return [p["slug"] for p in spawner.profile_list(spawner)]


# ---------------------------------------------------------------------------- who sees what


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bob", ["cpu"]),
        ("alice", ["cpu", "gpu-slice"]),
        ("carol", ["cpu", "gpu-slice", "gpu-half", "custom"]),
    ],
)
def test_profile_list_follows_the_users_groups(name: str, expected: list[str]) -> None:
    async def body(spawner: Any) -> tuple[list[str], str]:
        return slugs(spawner), await spawner.get_options_form()

    seen, page = with_spawner(name, body)
    assert seen == expected
    for slug in ("cpu", "gpu-slice", "gpu-half", "custom"):
        assert (f'value="{slug}"' in page) == (slug in expected), slug
    assert re.search(r'value="cpu"\s+checked', page)  # the default, for everyone


def test_custom_form_offers_bounded_choices_and_checks_free_images() -> None:
    page = with_spawner("carol", lambda s: s.get_options_form())
    assert 'name="profile-option-custom--gpu"' in page
    for key in ("none", "slices-1", "slices-2"):
        assert f'<option value="{key}"' in page
    assert 'value="gpus-' not in page
    assert f'pattern="{IMAGE_PATTERN}"' in page
    assert "1 of 4 slices of a GPU (8 GiB GPU memory)" in page


# ---------------------------------------------------------------------------- what a profile sets


def test_cpu_profile_has_no_gpu() -> None:
    pod = with_spawner("bob", lambda s: spawn_pod(s, {"profile": ["cpu"]}))
    resources = container(pod)["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    assert resources["limits"]["cpu"] == 2.0 and resources["requests"]["cpu"] == 0.5
    assert resources["limits"]["memory"] == 4 * GIB and resources["requests"]["memory"] == GIB
    assert container(pod)["image"] == "quay.io/jupyter/scipy-notebook:2024-12-02"
    variables = env(pod)
    assert variables["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "GPULANE_GPU_MEMORY_LIMIT" not in variables
    assert variables["GPULANE_PROFILE"] == "cpu"


def test_slice_profile_asks_for_one_gpu_and_caps_its_memory() -> None:
    pod = with_spawner("alice", lambda s: spawn_pod(s, {"profile": ["gpu-slice"], "_xsrf": ["x"]}))
    resources = container(pod)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["cpu"] == 4.0 and resources["limits"]["memory"] == 16 * GIB
    variables = env(pod)
    assert variables["GPULANE_GPU_MEMORY_LIMIT"] == str(8 * GIB)
    assert variables["GPULANE_GPU_MEMORY_FRACTION"] == "0.2500"
    assert variables["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2500"
    assert variables["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert "NVIDIA_VISIBLE_DEVICES" not in variables
    assert container(pod)["image"] == PYTORCH


def test_custom_profile_applies_the_chosen_values() -> None:
    form = {
        "profile": ["custom"],
        "profile-option-custom--image--unlisted-choice": ["docker.io/library/python:3.12"],
        "profile-option-custom--gpu": ["slices-2"],
        "profile-option-custom--cpus": ["8"],
        "profile-option-custom--memory": ["32G"],
    }

    async def body(spawner: Any) -> tuple[dict[str, Any], str]:
        pod = await spawn_pod(spawner, form)
        return pod, spawner.slow_spawn_message

    pod, waiting = with_spawner("carol", body)
    assert container(pod)["image"] == "docker.io/library/python:3.12"
    resources = container(pod)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == 8.0
    assert resources["limits"]["memory"] == 32 * GIB
    assert env(pod)["GPULANE_GPU_MEMORY_LIMIT"] == str(16 * GIB)
    assert "Waiting for a GPU" in waiting


def test_listed_custom_image_and_defaults() -> None:
    pod = with_spawner("carol", lambda s: spawn_pod(s, {"profile": ["custom"]}))
    assert container(pod)["image"] == PYTORCH
    assert container(pod)["resources"]["limits"]["cpu"] == 2.0
    assert env(pod)["NVIDIA_VISIBLE_DEVICES"] == "void"


# ---------------------------------------------------------------------------- forged forms


@pytest.mark.parametrize(
    ("name", "form", "expected"),
    [
        ("bob", {"profile": ["gpu-slice"]}, "no profile 'gpu-slice' for you; choose one of: cpu"),
        ("alice", {"profile": ["gpu-half"]}, "no profile 'gpu-half' for you"),
        ("alice", {"profile": ["custom"]}, "no profile 'custom' for you"),
        (
            "carol",
            {"profile": ["custom"], "profile-option-custom--gpu": ["gpus-4"]},
            "GPU choice 'gpus-4' is not offered",
        ),
        (
            "carol",
            {"profile": ["custom"], "profile-option-custom--cpus": ["64"]},
            "CPUs '64' is not offered; choose one of: 2, 4, 8",
        ),
        (
            "carol",
            {"profile": ["custom"], "profile-option-custom--memory": ["8.0G"]},
            "memory '8.0G' is not offered; choose one of: 8G, 16G, 32G",
        ),
        (
            "carol",
            {"profile": ["custom"], "profile-option-custom--cpus--unlisted-choice": ["64"]},
            "custom profile: cpus must be chosen from the list",
        ),
        (
            "carol",
            {"profile": ["custom"], "profile-option-custom--image--unlisted-choice": ["ubuntu"]},
            "image 'ubuntu' must look like registry/name:tag",
        ),
    ],
)
def test_tampered_form_is_refused_on_the_server(
    name: str, form: dict[str, list[str]], expected: str
) -> None:
    async def body(spawner: Any) -> None:
        spawner.run_options_from_form(form)

    with pytest.raises(ProfileError) as error:
        with_spawner(name, body)
    assert expected in str(error.value)


def test_options_from_the_rest_api_are_checked_before_the_pod() -> None:
    async def body(spawner: Any) -> None:
        spawner.user_options = {"profile": "gpu-slice"}  # POST /users/bob/server
        await spawner.run_pre_spawn_hook()

    with pytest.raises(ProfileError, match="no profile 'gpu-slice' for you"):
        with_spawner("bob", body)


def test_saved_options_stop_working_when_a_group_is_lost() -> None:
    async def body(spawner: Any) -> None:
        spawner.user_options = {"profile": "gpu-slice"}  # saved while alice was in gpu
        await spawner.run_pre_spawn_hook()

    with_spawner("alice", body)
    with pytest.raises(ProfileError, match="no profile 'gpu-slice' for you"):
        with_spawner("alice", body, groups=[])


def test_kubespawner_itself_refuses_a_profile_outside_the_list() -> None:
    async def body(spawner: Any) -> None:
        spawner.user_options = {"profile": "gpu-half"}
        await spawner.load_user_options()

    with pytest.raises(ValueError, match="No such profile: gpu-half"):
        with_spawner("alice", body)


def test_descriptions_are_escaped_for_kubespawners_template(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        '[[profile]]\nslug = "x"\ndisplay_name = "<img src=x onerror=alert(1)>"\n'
        'description = "<b>bold</b>"\n'
    )
    from kubespawner import KubeSpawner
    from traitlets.config import Config

    async def main() -> str:
        config = Config()
        configure_kubespawner(config, str(profiles))
        spawner = KubeSpawner(config=config, user=User("bob", []), _mock=True)
        page: str = await spawner.get_options_form()
        return page

    page = asyncio.run(main())
    assert "<img" not in page and "<b>" not in page
    assert html.escape("<img src=x onerror=alert(1)>") in page


def test_an_earlier_pre_spawn_hook_still_runs() -> None:
    from traitlets.config import Config

    ran: list[str] = []
    config = Config()
    config.KubeSpawner.pre_spawn_hook = lambda spawner: ran.append(spawner.user.name)
    configure_kubespawner(config, str(EXAMPLE))

    class Log:
        def info(self, *args: Any) -> None:
            pass

    class Spawner:
        user = User("bob", [])
        user_options: dict[str, Any] = {}  # noqa: RUF012
        log = Log()

    asyncio.run(config.KubeSpawner.pre_spawn_hook(Spawner()))
    assert ran == ["bob"]


def test_a_broken_profile_file_stops_the_hub(tmp_path: Path) -> None:
    from traitlets.config import Config

    broken = tmp_path / "profiles.toml"
    broken.write_text('[[profile]]\nslug = "gpu"\nslices = 2\n')
    with pytest.raises(
        ProfileError, match=r"profiles.toml: profile 'gpu': slices = 2 needs \[gpu\]"
    ):
        configure_kubespawner(Config(), str(broken))


# ---------------------------------------------------------------------------- queued GPU profiles


def lease_spawn(name: str, slug: str, job_id: int | None) -> tuple[Any, dict[str, Any]]:
    """GpulaneKubeSpawner's pre-spawn decision and, as after a grant of ``job_id``, its pod."""
    from kubespawner import KubeSpawner  # noqa: F401  (the offline kubeconfig is set)
    from traitlets.config import Config

    from gpulane.hub.kube_spawner import GpulaneKubeSpawner

    kubernetes_validate = need_module("kubernetes_validate")

    async def main() -> tuple[Any, dict[str, Any]]:
        config = Config()
        configure_kubespawner(config, str(EXAMPLE))
        config.GpulaneKubeSpawner.profiles_file = str(EXAMPLE)
        spawner = GpulaneKubeSpawner(config=config, user=User(name, USERS[name]), _mock=True)
        spawner.user_options = {"profile": slug}
        await spawner.run_pre_spawn_hook()
        spawner._job_id = job_id
        await spawner.load_user_options()
        manifest = await spawner.get_pod_manifest()
        pod = spawner.api.api_client.sanitize_for_serialization(manifest)
        pod.update(apiVersion="v1", kind="Pod")
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        return spawner, pod

    return asyncio.run(main())


def test_a_gpu_profile_queues_first_and_its_pod_carries_the_lease() -> None:
    from gpulane.broker.k8s_capacity import LEASE_LABEL

    spawner, pod = lease_spawn("alice", "gpu-slice", 42)
    assert spawner._lease is not None  # it waits in the broker's queue before any pod
    assert spawner.start_timeout == spawner.queue_timeout  # the hub waits for the queue
    assert spawner._own_start_timeout == 60  # the pod itself gets KubeSpawner's time
    assert pod["metadata"]["labels"][LEASE_LABEL] == "42"
    assert env(pod)["GPULANE_JOB_ID"] == "42"
    assert container(pod)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_cpu_profile_is_plain_kubespawner() -> None:
    from gpulane.broker.k8s_capacity import LEASE_LABEL

    spawner, pod = lease_spawn("alice", "cpu", None)
    assert spawner._lease is None and spawner.start_timeout == 60
    assert LEASE_LABEL not in pod["metadata"]["labels"]
    assert "GPULANE_JOB_ID" not in env(pod)


def test_a_forged_gpu_profile_is_refused_before_it_queues() -> None:
    with pytest.raises(ProfileError, match="no profile 'gpu-slice' for you"):
        lease_spawn("bob", "gpu-slice", None)
