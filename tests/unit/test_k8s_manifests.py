"""Generated Kubernetes configuration, validated offline against the Kubernetes schemas."""

from __future__ import annotations

import argparse
import copy
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gpulane.admin.k8s_hub_values import HubOptions, hub_values, rbac, render, render_rbac
from gpulane.admin.k8s_time_slicing import (
    K8sError,
    NodeReport,
    TimeSlicing,
    apply,
    check_nodes,
    cluster_policy_patch,
    configmap,
)
from gpulane.admin.k8s_time_slicing import render as render_time_slicing
from gpulane.profiles import ProfileError, load_profiles, load_profiles_file
from tests.support.users import IN_CI, need_module


def _module(name: str) -> Any:
    """Import a test prerequisite; skip this file without it (fail under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI:
            raise
        pytest.skip(
            f"{name} is not installed (pip install 'gpulane[test]')", allow_module_level=True
        )


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "profiles.toml"
K8S_VERSION = "1.30"  # the oldest Kubernetes the GPU Operator's current releases support
yaml = _module("yaml")
kubernetes_validate = _module("kubernetes_validate")

# spec.devicePlugin.config of the GPU Operator's ClusterPolicy CRD (nvidia.com/v1):
# the one part of it gpulane patches. kubernetes-validate holds built-in kinds only.
DEVICE_PLUGIN_CONFIG_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "default": {"type": "string"}},
    "additionalProperties": False,
}
# The NVIDIA device plugin's configuration file, the parts gpulane writes.
DEVICE_PLUGIN_FILE_SCHEMA = {
    "type": "object",
    "required": ["version"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": "v1"},
        "sharing": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "timeSlicing": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "renameByDefault": {"type": "boolean"},
                        "failRequestsGreaterThanOne": {"type": "boolean"},
                        "resources": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "replicas"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 2},
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def valid(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies ``--type merge``."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------- time-slicing


@pytest.mark.parametrize("rename", [False, True])
def test_time_slicing_configmap_is_schema_valid(rename: bool) -> None:
    plan = TimeSlicing(replicas=4, rename_shared=rename)
    manifest = configmap(plan)
    valid(manifest)
    sliced = yaml.safe_load(manifest["data"]["sliced"])
    jsonschema.validate(sliced, DEVICE_PLUGIN_FILE_SCHEMA)
    slicing = sliced["sharing"]["timeSlicing"]
    assert slicing["resources"] == [{"name": "nvidia.com/gpu", "replicas": 4}]
    assert slicing["renameByDefault"] is rename
    assert yaml.safe_load(manifest["data"]["whole"]) == {"version": "v1"}
    assert plan.resource == ("nvidia.com/gpu.shared" if rename else "nvidia.com/gpu")


def test_cluster_policy_patch_and_the_way_back() -> None:
    policy = {
        "apiVersion": "nvidia.com/v1",
        "kind": "ClusterPolicy",
        "metadata": {"name": "cluster-policy"},
        "spec": {"devicePlugin": {"enabled": True}, "driver": {"enabled": True}},
    }
    plan = TimeSlicing(replicas=8, configmap="slices")
    on = merge_patch(policy, cluster_policy_patch(plan))
    jsonschema.validate(on["spec"]["devicePlugin"]["config"], DEVICE_PLUGIN_CONFIG_SCHEMA)
    assert on["spec"]["devicePlugin"] == {
        "enabled": True,
        "config": {"name": "slices", "default": "sliced"},
    }
    assert on["spec"]["driver"] == {"enabled": True}
    off = merge_patch(on, cluster_policy_patch(TimeSlicing(replicas=None)))
    assert off == policy


def test_printed_time_slicing_applies_with_kubectl() -> None:
    text = render_time_slicing(TimeSlicing(replicas=4))
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(documents) == 1
    valid(documents[0])
    assert "GPU memory is NOT divided" in text and "--type merge" in text
    off = render_time_slicing(TimeSlicing(replicas=None))
    assert "delete configmap time-slicing-config" in off and '"config":null' in off


@pytest.mark.parametrize("replicas", [0, 1, 65])
def test_replicas_out_of_range(replicas: int) -> None:
    with pytest.raises(K8sError, match="must be from 2 to 64"):
        TimeSlicing(replicas=replicas)


def node(name: str, count: int | None, advertised: dict[str, int], **labels: str) -> dict[str, Any]:
    all_labels = dict(labels)
    if count is not None:
        all_labels["nvidia.com/gpu.count"] = str(count)
    return {
        "metadata": {"name": name, "labels": all_labels},
        "status": {"allocatable": {"cpu": "16", **{k: str(v) for k, v in advertised.items()}}},
    }


def test_node_check_expects_gpus_times_replicas() -> None:
    plan = TimeSlicing(replicas=4)
    reports = check_nodes(
        [
            node("a", 1, {"nvidia.com/gpu": 4}),
            node("b", 2, {"nvidia.com/gpu": 2}),
            node("c", 2, {"nvidia.com/gpu": 2}, **{"nvidia.com/device-plugin.config": "whole"}),
            node("d", None, {"nvidia.com/gpu": 1}),
            node("cpu-only", None, {}),
        ],
        plan,
    )
    assert [(r.name, r.expected, r.actual, r.ok) for r in reports] == [
        ("a", 4, 4, True),
        ("b", 8, 2, False),
        ("c", 2, 2, True),
        ("d", None, 1, True),
    ]
    assert "GPU Feature Discovery" in reports[3].line()
    shared = check_nodes(
        [node("a", 1, {"nvidia.com/gpu.shared": 4})], TimeSlicing(4, rename_shared=True)
    )
    assert shared[0].ok and shared[0].resource == "nvidia.com/gpu.shared"
    with pytest.raises(K8sError, match="no node has NVIDIA GPUs"):
        check_nodes([node("cpu-only", None, {})], plan)


class FakeCluster:
    """Records calls; nodes follow the configuration after ``settle`` node reads."""

    def __init__(
        self,
        gpus: int = 1,
        policies: tuple[str, ...] = ("cluster-policy",),
        settle: int = 2,
        stuck: bool = False,
    ) -> None:
        self.gpus = gpus
        self.policies = list(policies)
        self.settle = settle
        self.stuck = stuck
        self.replicas = 1
        self.calls: list[tuple[str, Any]] = []
        self.reads = 0

    def nodes(self) -> list[dict[str, Any]]:
        self.reads += 1
        advertised = (
            self.gpus if (self.stuck or self.reads < self.settle) else self.gpus * self.replicas
        )
        return [node("gpu-1", self.gpus, {"nvidia.com/gpu": advertised})]

    def put_configmap(self, manifest: dict[str, Any]) -> None:
        valid(manifest)
        self.calls.append(("put_configmap", manifest["metadata"]["name"]))

    def delete_configmap(self, namespace: str, name: str) -> None:
        self.calls.append(("delete_configmap", name))

    def cluster_policies(self) -> list[str]:
        return self.policies

    def patch_cluster_policy(self, name: str, patch: dict[str, Any]) -> None:
        config = patch["spec"]["devicePlugin"]["config"]
        self.replicas = 4 if config else 1
        self.calls.append(("patch", name))

    def restart_device_plugin(self, namespace: str) -> int:
        self.calls.append(("restart", namespace))
        return 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_apply(
    plan: TimeSlicing, cluster: FakeCluster, wait: float = 60
) -> tuple[list[NodeReport], list[str]]:
    said: list[str] = []
    clock = Clock()
    reports = apply(
        plan, cluster, wait=wait, poll=5, say=said.append, sleep=clock.sleep, clock=clock
    )
    return reports, said


def test_apply_configures_restarts_and_waits_for_the_nodes() -> None:
    cluster = FakeCluster(gpus=2, settle=3)
    reports, said = run_apply(TimeSlicing(replicas=4), cluster)
    assert cluster.calls == [
        ("put_configmap", "time-slicing-config"),
        ("patch", "cluster-policy"),
        ("restart", "gpu-operator"),
    ]
    assert reports[0].ok and reports[0].actual == 8 and cluster.reads == 3
    assert said[-1] == "gpu-1: allocatable 8 nvidia.com/gpu, as expected"


def test_apply_names_the_node_that_did_not_change() -> None:
    cluster = FakeCluster(stuck=True)
    with pytest.raises(K8sError) as error:
        run_apply(TimeSlicing(replicas=4), cluster, wait=30)
    message = str(error.value)
    assert "after 30 s 1 node(s) do not advertise GPUs x replicas" in message
    assert "gpu-1: allocatable 1 nvidia.com/gpu, expected 4 (1 GPU(s) x 4)" in message
    # No GFD replicas label on the fake node: the config was not applied, says which knobs.
    assert "replicas not applied (GFD says none)" in message
    assert "rollout restart daemonset/nvidia-device-plugin-daemonset" in message
    assert "kubectl -n gpu-operator logs -l app=nvidia-device-plugin-daemonset" in message
    assert len(message.splitlines()) == 1


def test_apply_without_the_gpu_operator() -> None:
    with pytest.raises(K8sError, match=r"no ClusterPolicy .* install the NVIDIA GPU Operator"):
        run_apply(TimeSlicing(replicas=4), FakeCluster(policies=()))


def test_disable_goes_back_to_whole_gpus() -> None:
    cluster = FakeCluster(gpus=1, settle=1)
    cluster.replicas = 4
    reports, _ = run_apply(TimeSlicing(replicas=None), cluster)
    assert ("delete_configmap", "time-slicing-config") in cluster.calls
    assert ("put_configmap", "time-slicing-config") not in cluster.calls
    assert reports[0].expected == 1 and reports[0].ok


# ---------------------------------------------------------------------------- hub values


def options(**changes: Any) -> HubOptions:
    fields: dict[str, Any] = {
        "public_url": "https://hub.example.org",
        "authorize_url": "https://sso.example.org/application/o/authorize/",
        "token_url": "https://sso.example.org/application/o/token/",
        "userdata_url": "https://sso.example.org/application/o/userinfo/",
        "client_id": "jupyterhub",
        "allowed_groups": ("gpu", "hpc", "students"),
        "admin_groups": ("hub-admins",),
        "hub_image": "registry.example.org/gpulane/k8s-hub:4.1.0",
        "nfs_server": "nfs.example.org",
        "home_export": "/export/home",
        "shared_export": "/export/shared",
    }
    fields.update(changes)
    return HubOptions(**fields)


def example() -> tuple[Any, str]:
    return load_profiles_file(EXAMPLE), EXAMPLE.read_text()


def pod_from_values(values: dict[str, Any]) -> dict[str, Any]:
    """The user pod the chart would make from these storage values (for schema checks)."""
    singleuser = values["singleuser"]
    storage = singleuser["storage"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "jupyter-alice"},
        "spec": {
            "volumes": storage["extraVolumes"],
            "containers": [
                {
                    "name": "notebook",
                    "image": "quay.io/jupyter/scipy-notebook:2024-12-02",
                    "env": [{"name": k, "value": v} for k, v in singleuser["extraEnv"].items()],
                    "volumeMounts": storage["extraVolumeMounts"],
                }
            ],
        },
    }


def test_hub_values_storage_tiers_are_schema_valid() -> None:
    pset, text = example()
    values = hub_values(pset, text, options())
    valid(pod_from_values(values))
    mounts = {m["name"]: m for m in values["singleuser"]["storage"]["extraVolumeMounts"]}
    assert mounts["home"]["mountPath"] == "/home/jovyan"
    assert mounts["persist"]["subPathExpr"] == "$(GPULANE_USER_DIR)"
    assert values["singleuser"]["extraEnv"]["GPULANE_USER_DIR"] == "{username}"
    volumes = {v["name"]: v for v in values["singleuser"]["storage"]["extraVolumes"]}
    assert "emptyDir" in volumes["home"] and volumes["persist"]["nfs"]["path"] == "/export/home"
    claims = hub_values(
        pset,
        text,
        options(
            nfs_server=None,
            home_export=None,
            shared_export=None,
            home_claim="home-rwx",
            shared_claim="team-rwx",
            shared_read_only=True,
        ),
    )
    valid(pod_from_values(claims))
    shared = next(
        v for v in claims["singleuser"]["storage"]["extraVolumes"] if v["name"] == "shared"
    )
    assert shared["persistentVolumeClaim"] == {"claimName": "team-rwx", "readOnly": True}


def test_hub_values_profiles_culling_and_oidc() -> None:
    pset, text = example()
    values = hub_values(pset, text, options())
    assert values["hub"]["extraFiles"]["gpulane-profiles"]["stringData"] == text
    assert (
        "configure_kubespawner(c, '/etc/gpulane/profiles.toml')"
        in values["hub"]["extraConfig"]["gpulane"]
    )
    assert values["hub"]["image"] == {
        "name": "registry.example.org/gpulane/k8s-hub",
        "tag": "4.1.0",
    }
    assert values["cull"] == {"enabled": True, "timeout": 3600, "every": 300, "users": False}
    auth = values["hub"]["config"]["GenericOAuthenticator"]
    assert auth["manage_groups"] is True and auth["auth_state_groups_key"] == "oauth_user.groups"
    assert auth["oauth_callback_url"] == "https://hub.example.org/hub/oauth_callback"
    assert "client_secret" not in auth
    secret = values["hub"]["extraEnv"]["OAUTH_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "gpulane-oidc", "key": "client-secret"}
    # The printed YAML reads back as the same values.
    assert yaml.safe_load(render(pset, text, options())) == values


def test_generic_oauthenticator_accepts_the_config() -> None:
    generic = need_module("oauthenticator.generic")
    from traitlets.config import Config

    pset, text = example()
    config = hub_values(pset, text, options())["hub"]["config"]
    authenticator = generic.GenericOAuthenticator(config=Config(config))
    assert authenticator.manage_groups is True
    assert authenticator.auth_state_groups_key == "oauth_user.groups"
    assert authenticator.allowed_groups == {"gpu", "hpc", "students"}
    assert authenticator.admin_groups == {"hub-admins"}
    assert authenticator.username_claim == "preferred_username"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"token_url": "http://sso.example.org/token"},
            "--token-url 'http://sso.example.org/token' must be an https:// URL",
        ),
        ({"home_export": None}, "--nfs-server, --home-export and --shared-export go together"),
        (
            {"nfs_server": None, "home_export": None, "shared_export": None},
            "say where persistent storage lives",
        ),
        (
            {"home_claim": "x"},
            "give NFS exports (--nfs-server ...) or PVCs (--home-claim ...), not both",
        ),
        ({"home_export": "/export/../etc"}, "must be an absolute path"),
        ({"hub_image": "k8s-hub"}, "--hub-image 'k8s-hub' must look like registry/name:tag"),
        ({"cull_timeout": 10}, "--cull-timeout 10 must be from 300"),
        ({"scratch_size": "lots"}, "--scratch-size 'lots' must be a quantity"),
    ],
)
def test_hub_values_refuse_bad_options(changes: dict[str, Any], expected: str) -> None:
    pset, text = example()
    with pytest.raises(K8sError) as error:
        hub_values(pset, text, options(**changes))
    assert expected in str(error.value)


def test_gpu_profiles_queue_at_a_broker_in_the_hub_pod() -> None:
    from traitlets.config import Config

    pset, text = example()
    code = hub_values(pset, text, options())["hub"]["extraConfig"]["gpulane"]
    assert 'spawner_class = "gpulane.hub.kube_spawner.GpulaneKubeSpawner"' in code
    # The hub runs it as its config: outside a hub, configure() applies at once.
    c = Config()
    exec(code.replace("/etc/gpulane/profiles.toml", str(EXAMPLE)), {"c": c})
    assert c.JupyterHub.spawner_class == "gpulane.hub.kube_spawner.GpulaneKubeSpawner"
    assert c.GpulaneKubeSpawner.profiles_file == str(EXAMPLE)
    (broker,) = [s for s in c.JupyterHub.services if s["name"] == "gpulane"]
    command = " ".join(broker["command"])
    assert "--gpu-source k8s --gpu-resource nvidia.com/gpu" in command
    assert "--slices 4" in command  # the time-slicing replicas of the profile file
    assert "--state-dir /srv/jupyterhub/gpulane" in command  # the hub's own volume
    assert c.GpulaneKubeSpawner.broker_socket in command
    assert not [s for s in c.JupyterHub.services if s["name"] == "idle-culler"]
    assert callable(c.KubeSpawner.profile_list)


def test_cpu_profiles_alone_need_no_broker() -> None:
    pset = load_profiles({"profile": [{"slug": "cpu"}]})
    code = hub_values(pset, "", options())["hub"]["extraConfig"]["gpulane"]
    assert "configure_kubespawner" in code and "GpulaneKubeSpawner" not in code


def test_the_brokers_rbac_reads_nodes_and_pods_and_nothing_more() -> None:
    documents = rbac(options(namespace="research", hub_service_account="hub"))
    for document in documents:
        valid(document)
    role, binding, workers = documents
    assert workers["kind"] == "NetworkPolicy"  # no Role: the chart's covers worker pods
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["list"]}]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "hub", "namespace": "research"}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [d for d in yaml.safe_load_all(render_rbac(options())) if d] == rbac(options())
    with pytest.raises(K8sError, match="--namespace 'Bad_NS' must be a Kubernetes name"):
        hub_values(example()[0], "", options(namespace="Bad_NS"))


def test_worker_pods_need_nothing_beyond_the_charts_hub_role(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpulane.admin import k8s_hub_values
    from gpulane.admin.k8s_network import CHART_HUB_ROLE, WORKER_NEEDS, missing

    assert missing(WORKER_NEEDS, CHART_HUB_ROLE) == []
    # A Role without what the chart's grants to Secrets and events: exactly that is missing,
    # and hub-values would write a Role (in the hub's namespace) for it, and nothing more.
    pods_only = ({"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},)
    lacking = missing(WORKER_NEEDS, pods_only)
    assert {r for _, r in lacking} == {"secrets", "events"} and len(lacking) == 8
    monkeypatch.setattr(k8s_hub_values, "CHART_HUB_ROLE", pods_only)
    documents = rbac(options(namespace="research"))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "NetworkPolicy"]
    for document in documents:
        valid(document)
    role = documents[2]
    assert role["metadata"]["namespace"] == "research"
    assert sorted((r["verbs"][0], r["resources"][0]) for r in role["rules"]) == sorted(lacking)


def test_network_policies_are_schema_valid() -> None:
    from gpulane.admin.k8s_network import chart_values, worker_policy
    from tests.support.netpol import chart_policies

    valid(worker_policy("jhub"))
    valid(worker_policy("jhub", (40000, 40000)))  # one port: no endPort
    assert "endPort" not in worker_policy("jhub", (40000, 40000))["spec"]["egress"][0]["ports"][0]
    # gpulane's rules inside the chart's own policies, as the chart renders them.
    pset, text = example()
    values = hub_values(pset, text, options())
    for policy in chart_policies(values):
        valid(policy)
    assert values["singleuser"]["networkPolicy"] == chart_values()["singleuser"]["networkPolicy"]
    # The hub's Service as the chart writes it, with the extra port for gpulane's service.
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "hub"},
        "spec": {
            "selector": {"component": "hub"},
            "ports": [
                {"name": "hub", "port": 8081, "targetPort": "http"},
                *values["hub"]["service"]["extraPorts"],
            ],
        },
    }
    valid(service)


def test_the_dashboard_is_served_on_the_hubs_service() -> None:
    from traitlets.config import Config

    pset, text = example()
    values = hub_values(pset, text, options())
    code = values["hub"]["extraConfig"]["gpulane"]
    c = Config()
    exec(code.replace("/etc/gpulane/profiles.toml", str(EXAMPLE)), {"c": c})
    (broker,) = [s for s in c.JupyterHub.services if s["name"] == "gpulane"]
    # The proxy (another pod) sends /services/gpulane/ to the hub's Service, on the port
    # the dashboard listens on, on the pod's addresses; the port is the Service's extra one.
    assert broker["url"] == "http://hub:9873"
    command = broker["command"]
    assert command[command.index("--dashboard-ip") + 1] == "0.0.0.0"
    assert command[command.index("--dashboard-port") + 1] == "9873"
    # The broker's API for kernels in user pods on its own port, and their URL of it.
    assert command[command.index("--api-ip") + 1] == "0.0.0.0"
    assert command[command.index("--api-port") + 1] == "9874"
    assert c.Spawner.environment["GPULANE_BROKER_URL"] == "http://hub:9874"
    assert c.Spawner.environment["GPULANE_BACKEND"] == "kubernetes"
    assert "GPULANE_SOCKET" not in c.Spawner.environment  # no socket in a user pod
    dashboard, api = values["hub"]["service"]["extraPorts"]
    assert dashboard["port"] == dashboard["targetPort"] == 9873
    assert api == {"name": "gpulane-api", "port": 9874, "targetPort": 9874}
    to_dashboard, to_api = values["hub"]["networkPolicy"]["ingress"]
    assert to_dashboard["ports"] == [{"protocol": "TCP", "port": 9873}]
    assert to_dashboard["from"][0]["podSelector"]["matchLabels"]["component"] == "proxy"
    assert to_api["ports"] == [{"protocol": "TCP", "port": 9874}]
    assert to_api["from"][0]["podSelector"]["matchLabels"]["component"] == "singleuser-server"
    # Without GPU profiles there is no broker, and nothing is opened.
    plain = hub_values(load_profiles({"profile": [{"slug": "cpu"}]}), "", options())
    assert "networkPolicy" not in plain["singleuser"] and "proxy" not in plain
    assert "service" not in plain["hub"]
    header = render(pset, text, options())
    assert "# Network: the chart's policies let the proxy reach port 9873" in header
    assert "kernels in user pods port 9874" in header and "no TLS" in header


@pytest.mark.parametrize("ports", [(80, 90), (50000, 40000), (1024, 70000)])
def test_worker_ports_out_of_range(ports: tuple[int, int]) -> None:
    with pytest.raises(K8sError, match=r"--worker-ports .* must be ports from 1024 to 65535"):
        hub_values(example()[0], "", options(worker_ports=ports))


def test_whole_gpus_need_renamed_slices_on_kubernetes() -> None:
    data: dict[str, Any] = {
        "gpu": {"slices_per_gpu": 4, "memory": "32G"},
        "profile": [{"slug": "big", "gpus": 1}, {"slug": "small", "slices": 1}],
    }
    with pytest.raises(ProfileError, match="big ask for whole GPUs, but with slices_per_gpu = 4"):
        hub_values(load_profiles(data), "", options())
    renamed = copy.deepcopy(data)
    renamed["gpu"]["slice_resource"] = "nvidia.com/gpu.shared"
    assert hub_values(load_profiles(renamed), "", options())


# ---------------------------------------------------------------------------- the commands


@pytest.fixture
def gpulane_k8s(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    from gpulane.cli import build_parser, dispatch

    parser = build_parser()

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            args: argparse.Namespace = parser.parse_args(argv)
        except SystemExit as exit_:
            out = capsys.readouterr()
            return int(exit_.code or 0), out.out, out.err
        status = dispatch(args)
        out = capsys.readouterr()
        return status, out.out, out.err

    yield run


def test_time_slicing_command(gpulane_k8s: Any) -> None:
    status, out, _ = gpulane_k8s("k8s", "time-slicing", "--profiles", str(EXAMPLE))
    assert status == 0
    valid(next(d for d in yaml.safe_load_all(out) if d))
    assert "replicas: 4" in out
    status, _, err = gpulane_k8s(
        "k8s", "time-slicing", "--replicas", "8", "--profiles", str(EXAMPLE)
    )
    assert status == 1 and "--replicas 8 but" in err and "slices_per_gpu = 4" in err
    status, _, err = gpulane_k8s("k8s", "time-slicing", "--replicas", "4", "--disable")
    assert status == 2 and "not allowed with argument" in err and len(err.splitlines()) == 1
    status, _, err = gpulane_k8s("k8s", "time-slicing")
    assert status == 1 and "give --replicas N" in err


def test_hub_values_command(gpulane_k8s: Any, tmp_path: Path) -> None:
    out_file = tmp_path / "values.yaml"
    status, _, err = gpulane_k8s(
        "k8s", "hub-values", "--profiles", str(EXAMPLE), "--out", str(out_file),
        "--public-url", "https://hub.example.org",
        "--authorize-url", "https://sso.example.org/authorize",
        "--token-url", "https://sso.example.org/token",
        "--userdata-url", "https://sso.example.org/userinfo",
        "--client-id", "jhub", "--home-claim", "homes", "--shared-claim", "team",
        "--allowed-groups", "gpu, hpc", "--hub-image", "registry.example.org/hub:1",
    )  # fmt: skip
    assert status == 0, err
    values = yaml.safe_load(out_file.read_text())
    valid(pod_from_values(values))
    assert values["hub"]["config"]["GenericOAuthenticator"]["allowed_groups"] == ["gpu", "hpc"]
    assert "wrote " + str(tmp_path / "gpulane-rbac.yaml") in err  # beside the values
    documents = [d for d in yaml.safe_load_all((tmp_path / "gpulane-rbac.yaml").read_text()) if d]
    for document in documents:
        valid(document)
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "jhub" and policy["spec"]["ingress"] == []
    status, _, err = gpulane_k8s("k8s", "hub-values", "--profiles", str(EXAMPLE))
    assert status == 2 and "required" in err
    status, _, err = gpulane_k8s(
        "k8s", "hub-values", "--profiles", str(EXAMPLE), "--worker-ports", "40000-3"
    )
    assert status == 2 and "'40000-3' must be ports from 1024 to 65535" in err


# ---------------------------------------------------------------------------- --apply, over HTTP


class FakeApiServer:
    """Just enough of a Kubernetes API server (plain HTTP) for ``--apply``'s calls."""

    def __init__(self, gpus: int = 1) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.gpus = gpus
        self.replicas = 1
        self.requests: list[tuple[str, str, str, Any]] = []
        self.configmaps: dict[str, Any] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                path = self.path.split("?")[0]
                server.requests.append(
                    (self.command, path, self.headers.get("Content-Type", ""), body)
                )
                self.reply(*server.route(self.command, path, body))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        configmaps = "/api/v1/namespaces/gpu-operator/configmaps"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "nvidia-device-plugin-daemonset-x1"},
        }
        if (method, path) == ("GET", "/api/v1/nodes"):
            gpus = {"nvidia.com/gpu": str(self.gpus * self.replicas)}
            node = {
                "metadata": {"name": "gpu-1", "labels": {"nvidia.com/gpu.count": str(self.gpus)}},
                "status": {"allocatable": {"cpu": "16", **gpus}},
            }
            return 200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": [node]}
        if (method, path) == ("GET", "/apis/nvidia.com/v1/clusterpolicies"):
            items = [
                {
                    "apiVersion": "nvidia.com/v1",
                    "kind": "ClusterPolicy",
                    "metadata": {"name": "cluster-policy"},
                }
            ]
            return 200, {"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicyList", "items": items}
        if (method, path) == ("PATCH", "/apis/nvidia.com/v1/clusterpolicies/cluster-policy"):
            config = body["spec"]["devicePlugin"]["config"]
            self.replicas = 4 if config else 1
            return 200, {
                "apiVersion": "nvidia.com/v1",
                "kind": "ClusterPolicy",
                "metadata": {"name": "cluster-policy"},
            }
        if path.startswith(configmaps + "/") and method in ("GET", "DELETE"):
            name = path.rsplit("/", 1)[1]
            if name not in self.configmaps:
                return 404, {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                    "message": f'configmaps "{name}" not found',
                }
            found = self.configmaps.pop(name) if method == "DELETE" else self.configmaps[name]
            return 200, found
        if (method, path) == ("POST", configmaps) or (
            method == "PUT" and path.startswith(configmaps)
        ):
            self.configmaps[body["metadata"]["name"]] = body
            return 201, body
        if (method, path) == ("GET", "/api/v1/namespaces/gpu-operator/pods"):
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]}
        if method == "DELETE" and path.startswith("/api/v1/namespaces/gpu-operator/pods/"):
            return 200, pod
        return 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "code": 404,
            "message": f"no route {method} {path}",
        }

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_apply_through_the_kubernetes_client(tmp_path: Path) -> None:
    _module("kubernetes")
    from gpulane.admin.k8s_time_slicing import KubeCluster

    api = FakeApiServer(gpus=2)
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                    "users": [{"name": "admin", "user": {"token": "t"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "admin"}}],
                    "current-context": "fake",
                }
            )
        )
        cluster = KubeCluster(config_file=str(kubeconfig))
        reports, _ = run_apply(TimeSlicing(replicas=4), cluster)
        assert reports[0].ok and reports[0].actual == 8
        created = api.configmaps["time-slicing-config"]
        valid(created)
        assert "replicas: 4" in created["data"]["sliced"]
        patches = [r for r in api.requests if r[0] == "PATCH"]
        assert patches[0][2].startswith("application/merge-patch+json")
        assert patches[0][3] == {
            "spec": {
                "devicePlugin": {"config": {"name": "time-slicing-config", "default": "sliced"}}
            }
        }
        assert any(r[0] == "DELETE" and "/pods/" in r[1] for r in api.requests)
        # Applying again replaces the ConfigMap; then the way back deletes it.
        run_apply(TimeSlicing(replicas=4), cluster)
        assert any(r[0] == "PUT" for r in api.requests)
        reports, _ = run_apply(TimeSlicing(replicas=None), cluster)
        assert reports[0].actual == 2 and "time-slicing-config" not in api.configmaps
        last_patch = [r for r in api.requests if r[0] == "PATCH"][-1]
        assert last_patch[3] == {"spec": {"devicePlugin": {"config": None}}}
    finally:
        api.close()


def test_apply_names_an_unreachable_api(tmp_path: Path) -> None:
    _module("kubernetes")
    from gpulane.admin.k8s_time_slicing import KubeCluster

    with pytest.raises(K8sError, match="no Kubernetes credentials"):
        KubeCluster(config_file=str(tmp_path / "missing"))
