"""Values for the zero-to-jupyterhub Helm chart: profiles, OIDC groups, culling, three storage tiers.

The hub image must have gpulane installed (``pip install 'gpulane[k8s]'`` on top of
the chart's k8s-hub image): the values mount the profile file into the hub and
call :func:`gpulane.hub.kube.configure_kubespawner` from ``hub.extraConfig``, so a
mistake in the file stops the hub at start-up with one line naming it. Where the
file has GPU profiles, the same ``extraConfig`` runs the broker in the hub pod on
the cluster's GPUs and makes GPU profiles queue there
(:class:`gpulane.hub.kube_spawner.GpulaneKubeSpawner`); :func:`rbac` is the one
extra permission that needs: reading nodes and pods cluster-wide, nothing else. The broker's
``%%gpu`` worker pods need no more RBAC than the chart's hub Role gives, and a network
policy of their own plus a few rules in the chart's (:mod:`gpulane.admin.k8s_network`):
:func:`rbac` writes the first, :func:`hub_values` the second, with the gpulane service
(the dashboard) on the hub's Service, where the chart's proxy reaches it.

Storage, as three tiers:

- home (``/home/jovyan``): an emptyDir on the node's disk, fast and gone when
  the server stops;
- persist (``/home/jovyan/persist``): one folder per user on NFS, chosen by
  ``subPathExpr`` from a variable KubeSpawner fills with the escaped user name,
  so a user's pod mounts only its own folder;
- shared (``/home/jovyan/shared``): one NFS folder the whole team mounts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gpulane.admin.k8s_network import (
    API_PORT,
    CALLBACK_PORTS,
    CHART_HUB_ROLE,
    SERVICE_HOST,
    SERVICE_PORT,
    WORKER_NEEDS,
    chart_values,
    missing,
    worker_policy,
)
from gpulane.admin.k8s_time_slicing import K8sError, yaml_dump
from gpulane.config import USER_DIR_ENV
from gpulane.profiles import IMAGE_RE, ProfileSet

PROFILES_PATH = "/etc/gpulane/profiles.toml"
# On the hub's own volume (z2jh mounts one at /srv/jupyterhub): the lease database
# survives a hub pod's restart.
BROKER_STATE = "/srv/jupyterhub/gpulane"
BROKER_SOCKET = "/srv/jupyterhub/gpulane/run/broker.sock"
RBAC_NAME = "gpulane-hub-gpu-capacity"
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_QUANTITY_RE = re.compile(r"\d{1,6}(\.\d{1,3})?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9a-fA-F:.]+\]")
_CLAIM_RE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


@dataclass(frozen=True)
class HubOptions:
    """Everything ``gpulane k8s hub-values`` asks for besides the profile file."""

    public_url: str
    authorize_url: str
    token_url: str
    userdata_url: str
    client_id: str
    client_secret_name: str = "gpulane-oidc"  # a Secret with the key client-secret
    scopes: tuple[str, ...] = ("openid", "profile", "email", "groups")
    username_claim: str = "preferred_username"
    groups_claim: str = "groups"
    allowed_groups: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    hub_image: str | None = None
    cull_timeout: int = 3600
    cull_every: int = 300
    start_timeout: int = 900
    scratch_size: str = "20Gi"
    nfs_server: str | None = None
    home_export: str | None = None
    shared_export: str | None = None
    home_claim: str | None = None
    shared_claim: str | None = None
    shared_read_only: bool = False
    home: str = "/home/jovyan"
    extra_env: dict[str, str] = field(default_factory=dict)
    namespace: str = "jhub"  # the hub's namespace (of its service account)
    hub_service_account: str = "hub"  # the chart's default name
    # Where a kernel's callback listener (port 0) lands in the user image: %%gpu workers
    # may reach user pods on these ports only.
    worker_ports: tuple[int, int] = CALLBACK_PORTS

    def check(self) -> None:
        for name in ("public_url", "authorize_url", "token_url", "userdata_url"):
            url = getattr(self, name)
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.netloc:
                raise K8sError(
                    f"--{name.replace('_', '-')} {url!r} must be an https:// URL "
                    "(OIDC tokens must not cross the network in clear)"
                )
        if (
            not self.client_id
            or len(self.client_id) > 200
            or any(c.isspace() for c in self.client_id)
        ):
            raise K8sError("--client-id must be the OIDC client's ID, without spaces")
        if not _NAME_RE.fullmatch(self.client_secret_name):
            raise K8sError(
                f"--client-secret-name {self.client_secret_name!r} must be a Kubernetes name "
                "(lower-case letters, digits, '-')"
            )
        for name in ("username_claim", "groups_claim"):
            if not _CLAIM_RE.fullmatch(getattr(self, name)):
                raise K8sError(f"--{name.replace('_', '-')} must be a claim name such as 'groups'")
        if self.hub_image is not None and not IMAGE_RE.fullmatch(self.hub_image):
            raise K8sError(
                f"--hub-image {self.hub_image!r} must look like registry/name:tag "
                "(a k8s-hub image with gpulane installed)"
            )
        for name, low, high in (
            ("cull_timeout", 300, 30 * 86400),
            ("cull_every", 60, 86400),
            ("start_timeout", 60, 86400),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise K8sError(
                    f"--{name.replace('_', '-')} {value} must be from {low} to {high} seconds"
                )
        if not _QUANTITY_RE.fullmatch(self.scratch_size):
            raise K8sError(f"--scratch-size {self.scratch_size!r} must be a quantity such as 20Gi")
        inline = (self.nfs_server, self.home_export, self.shared_export)
        claims = (self.home_claim, self.shared_claim)
        if any(inline) and any(claims):
            raise K8sError(
                "give NFS exports (--nfs-server ...) or PVCs (--home-claim ...), not both"
            )
        if any(inline) and not all(inline):
            raise K8sError("--nfs-server, --home-export and --shared-export go together")
        if any(claims) and not all(claims):
            raise K8sError("--home-claim and --shared-claim go together")
        if not any(inline) and not any(claims):
            raise K8sError(
                "say where persistent storage lives: --nfs-server HOST --home-export /path "
                "--shared-export /path, or --home-claim PVC --shared-claim PVC (ReadWriteMany)"
            )
        if self.nfs_server and not _HOST_RE.fullmatch(self.nfs_server):
            raise K8sError(f"--nfs-server {self.nfs_server!r} must be a host name or address")
        for name in ("home_export", "shared_export"):
            path = getattr(self, name)
            if path and (not path.startswith("/") or ".." in path.split("/")):
                raise K8sError(f"--{name.replace('_', '-')} {path!r} must be an absolute path")
        for name in ("home_claim", "shared_claim"):
            claim = getattr(self, name)
            if claim and not _NAME_RE.fullmatch(claim):
                raise K8sError(f"--{name.replace('_', '-')} {claim!r} must be a PVC name")
        low, high = self.worker_ports
        if not 1024 <= low <= high <= 65535:
            raise K8sError(
                f"--worker-ports {low}-{high} must be ports from 1024 to 65535, the low one first"
            )
        for name in ("namespace", "hub_service_account"):
            if not _NAME_RE.fullmatch(getattr(self, name)):
                raise K8sError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r} must be a Kubernetes name"
                )


def storage(options: HubOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The user pod's volumes and mounts for the three tiers."""
    home = options.home.rstrip("/") or "/"

    def source(export: str | None, claim: str | None, read_only: bool) -> dict[str, Any]:
        if claim:
            return {"persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
        return {"nfs": {"server": options.nfs_server, "path": export, "readOnly": read_only}}

    volumes = [
        {"name": "home", "emptyDir": {"sizeLimit": options.scratch_size}},
        {"name": "persist", **source(options.home_export, options.home_claim, False)},
        {
            "name": "shared",
            **source(options.shared_export, options.shared_claim, options.shared_read_only),
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "home", "mountPath": home},
        {
            "name": "persist",
            "mountPath": f"{home}/persist",
            # KubeSpawner expands {username} (escaped, so no '/' or '..') into this variable.
            "subPathExpr": f"$({USER_DIR_ENV})",
        },
        {"name": "shared", "mountPath": f"{home}/shared", "readOnly": options.shared_read_only},
    ]
    return volumes, mounts


def authenticator_config(options: HubOptions) -> dict[str, Any]:
    """GenericOAuthenticator settings: OIDC login, hub groups from the groups claim."""
    config: dict[str, Any] = {
        "manage_groups": True,  # hub groups follow the identity provider at every login
        "client_id": options.client_id,
        "oauth_callback_url": options.public_url.rstrip("/") + "/hub/oauth_callback",
        "authorize_url": options.authorize_url,
        "token_url": options.token_url,
        "userdata_url": options.userdata_url,
        "scope": list(options.scopes),
        "username_claim": options.username_claim,
        "auth_state_groups_key": f"oauth_user.{options.groups_claim}",
        "login_service": "single sign-on",
    }
    if options.allowed_groups:
        config["allowed_groups"] = sorted(options.allowed_groups)
    else:
        config["allow_all"] = True
    if options.admin_groups:
        config["admin_groups"] = sorted(options.admin_groups)
    return config


def queues_gpus(pset: ProfileSet) -> bool:
    """True where the profiles ask for GPUs: the broker then runs in the hub pod."""
    custom_gpus = pset.custom is not None and any(g or k for g, k in pset.custom.gpu_options)
    return custom_gpus or any(p.uses_gpu for p in pset.profiles)


def extra_config(pset: ProfileSet) -> str:
    """The hub's ``extraConfig``: the profiles and, with GPU profiles, their queue."""
    lines = [
        "from gpulane.hub.kube import configure_kubespawner",
        f"configure_kubespawner(c, {PROFILES_PATH!r})",
    ]
    if not queues_gpus(pset):
        return "\n".join(lines) + "\n"
    # The broker counts the resource the GPU profiles ask for: slices where time-sliced.
    resource = pset.slice_resource if pset.slices_per_gpu > 1 else "nvidia.com/gpu"
    lines += [
        "from gpulane.hub import configure",
        "# GPU profiles wait in the broker's queue (in this pod) before their pod exists.",
        'c.JupyterHub.spawner_class = "gpulane.hub.kube_spawner.GpulaneKubeSpawner"',
        f"c.GpulaneKubeSpawner.profiles_file = {PROFILES_PATH!r}",
        f"c.GpulaneKubeSpawner.broker_socket = {BROKER_SOCKET!r}",
        "configure(",
        "    c,",
        '    gpu_source="k8s",',
        f"    gpu_resource={resource!r},",
        f"    slices={pset.slices_per_gpu},",
        f"    broker_socket={BROKER_SOCKET!r},",
        f"    state_dir={BROKER_STATE!r},",
        "    idle_culler=False,  # the chart's cull section stops idle servers",
        "    # The chart's proxy is another pod: the dashboard on the hub's Service.",
        '    dashboard_ip="0.0.0.0",',
        f"    dashboard_url={f'http://{SERVICE_HOST}:{SERVICE_PORT}'!r},",
        f"    dashboard_port={SERVICE_PORT},",
        "    # Kernels in user pods reach the broker's API on its own port, with their hub token.",
        f"    api_port={API_PORT},",
        f"    api_url={f'http://{SERVICE_HOST}:{API_PORT}'!r},",
        ")",
    ]
    return "\n".join(lines) + "\n"


def rbac(options: HubOptions) -> list[dict[str, Any]]:
    """What the broker in the hub pod needs beyond the chart's own hub Role: to list
    nodes (their allocatable GPUs) and pods in every namespace (GPU pods gpulane did not
    lease). Read-only, ``list`` only; pods in the hub's namespace (create, watch, delete)
    are the chart's Role already, for KubeSpawner and the pod keeper alike, and so are the
    worker pods' pods, Secrets and events (a Role here only for what it lacks). Then the
    worker pods' NetworkPolicy (:func:`gpulane.admin.k8s_network.worker_policy`)."""
    labels = {"app.kubernetes.io/part-of": "gpulane"}
    lacking = missing(WORKER_NEEDS, CHART_HUB_ROLE)
    workers: list[dict[str, Any]] = []
    if lacking:  # nothing today; kept so that a new need cannot go unwritten
        name = f"{RBAC_NAME}-workers"
        workers = [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
                "rules": [
                    {"apiGroups": [""], "resources": [resource], "verbs": [verb]}
                    for verb, resource in lacking
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [
                    {
                        "kind": "ServiceAccount",
                        "name": options.hub_service_account,
                        "namespace": options.namespace,
                    }
                ],
            },
        ]
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": RBAC_NAME, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{RBAC_NAME}-{options.namespace}", "labels": labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": RBAC_NAME,
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": options.hub_service_account,
                    "namespace": options.namespace,
                }
            ],
        },
        *workers,
        worker_policy(options.namespace, options.worker_ports),
    ]


def render_rbac(options: HubOptions) -> str:
    header = (
        "# RBAC for gpulane's broker in the hub pod, written by gpulane k8s hub-values,\n"
        "# and the NetworkPolicy of its %%gpu worker pods (no ingress; egress to user pods'\n"
        f"# ports {options.worker_ports[0]}-{options.worker_ports[1]} and DNS only).\n"
        "# kubectl apply -f this-file.yaml   (RBAC read-only: list nodes and pods; the chart's\n"
        "# hub Role already lets the hub create and delete worker pods and their Secrets)\n"
    )
    return header + "---\n".join(yaml_dump(doc) for doc in rbac(options))


def hub_values(pset: ProfileSet, profiles_text: str, options: HubOptions) -> dict[str, Any]:
    """The Helm values (a dict; :func:`render` writes it as YAML)."""
    from gpulane.hub.kube import check_for_kubernetes

    options.check()
    check_for_kubernetes(pset)
    volumes, mounts = storage(options)
    hub: dict[str, Any] = {
        "config": {
            "JupyterHub": {"authenticator_class": "generic-oauth"},
            "GenericOAuthenticator": authenticator_config(options),
        },
        "extraEnv": {
            # The client secret stays in a Secret; OAuthenticator reads this variable.
            "OAUTH_CLIENT_SECRET": {
                "valueFrom": {
                    "secretKeyRef": {"name": options.client_secret_name, "key": "client-secret"}
                }
            }
        },
        "extraFiles": {
            "gpulane-profiles": {"mountPath": PROFILES_PATH, "stringData": profiles_text},
        },
        "extraConfig": {"gpulane": extra_config(pset)},
    }
    if options.hub_image:
        name, _, tag = options.hub_image.rpartition(":")
        hub["image"] = {"name": name, "tag": tag}
    default_image = next((p.image for p in pset.profiles if p.default and p.image), None)
    singleuser: dict[str, Any] = {
        "startTimeout": options.start_timeout,
        "storage": {
            "type": "none",
            "homeMountPath": options.home,
            "extraVolumes": volumes,
            "extraVolumeMounts": mounts,
        },
        "extraEnv": {USER_DIR_ENV: "{username}", **options.extra_env},
    }
    if default_image:
        name, _, tag = default_image.rpartition(":")
        singleuser["image"] = {"name": name, "tag": tag}
    values: dict[str, Any] = {
        "hub": hub,
        "singleuser": singleuser,
        "cull": {
            "enabled": True,
            "timeout": options.cull_timeout,
            "every": options.cull_every,
            "users": False,
        },
    }
    if queues_gpus(pset):
        # The broker runs: its service port open to the proxy and the kernels, the user
        # pods' callback ports to %%gpu workers, in the chart's own network policies.
        _merge(values, chart_values(SERVICE_PORT, options.worker_ports, API_PORT))
    return values


def _merge(target: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def render(pset: ProfileSet, profiles_text: str, options: HubOptions) -> str:
    values = hub_values(pset, profiles_text, options)
    gpu_profiles = [p.slug for p in pset.profiles if p.uses_gpu]
    header = [
        "# zero-to-jupyterhub values written by gpulane k8s hub-values.",
        "# helm upgrade --install jhub jupyterhub/jupyterhub -n jhub -f this-file.yaml",
        f"# Before: kubectl -n jhub create secret generic {options.client_secret_name} "
        "--from-literal=client-secret=...",
        "# The hub image must include gpulane (FROM quay.io/jupyterhub/k8s-hub:<chart version>;",
        "#   RUN pip install 'gpulane[k8s]'), given with --hub-image.",
        f"# GPU profiles: {', '.join(gpu_profiles) or 'none'}; a GPU pod waits for a free GPU up to "
        f"{options.start_timeout} s, idle servers are culled after {options.cull_timeout} s.",
        "# Persistent files: ~/persist (per user) and ~/shared (team); the rest of ~ is scratch.",
    ]
    if queues_gpus(pset):
        low, high = options.worker_ports
        header.append(
            f"# Network: the chart's policies let the proxy reach port {SERVICE_PORT} of the hub "
            f"pod (the gpulane service, the dashboard), kernels in user pods port {API_PORT} "
            f"(the broker's API, hub tokens only, no TLS inside the cluster), and %%gpu worker "
            f"pods reach user pods on {low}-{high}; the workers' own policy is in gpulane-rbac.yaml."
        )
    if not options.hub_image:
        header.append("# WARNING: no --hub-image: the chart's default hub image lacks gpulane.")
    return "\n".join(header) + "\n" + yaml_dump(values)
