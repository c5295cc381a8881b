"""Kubernetes commands: ``gpulane k8s time-slicing`` and ``gpulane k8s hub-values``.

``cli.py`` lists :data:`COMMANDS` (name, help, the function that defines its options and
names the function that runs it). Importing this module is cheap: PyYAML and the
kubernetes client are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gpulane.admin.k8s_network import CALLBACK_PORTS, parse_ports
from gpulane.errors import GpulaneError


def _seconds(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}")
    return int(text)


def _replicas(text: str) -> int:
    if not text.isdigit() or len(text) > 3:
        raise argparse.ArgumentTypeError(f"expected a whole number of replicas, got {text!r}")
    return int(text)


def _ports(text: str) -> tuple[int, int]:
    try:
        return parse_ports(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(sorted({part.strip() for part in text.split(",") if part.strip()}))


def define_k8s(k8s: argparse.ArgumentParser) -> None:
    """``gpulane k8s time-slicing`` and ``gpulane k8s hub-values``, their options."""
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True, parser_class=type(k8s))

    ts = k8s_sub.add_parser(
        "time-slicing",
        help="NVIDIA time-slicing for the GPU Operator (ConfigMap + ClusterPolicy patch)",
        description="Print (or --apply) the device plugin's time-slicing ConfigMap and the "
        "GPU Operator ClusterPolicy patch that points at it. Time-slicing shares a GPU's "
        "compute in turns; it does not divide its memory or isolate faults.",
    )
    ts.set_defaults(func=_reported(_time_slicing))
    what = ts.add_mutually_exclusive_group()
    what.add_argument(
        "--replicas", metavar="N", type=_replicas, help="advertise each GPU as N slices (2-64)"
    )
    what.add_argument("--disable", action="store_true", help="turn time-slicing off again")
    ts.add_argument(
        "--profiles",
        metavar="FILE",
        help="the profile file: N defaults to its [gpu] slices_per_gpu, and must agree with it",
    )
    ts.add_argument("--namespace", default="gpu-operator", help="the GPU Operator's namespace")
    ts.add_argument("--configmap", default="time-slicing-config", help="the ConfigMap's name")
    ts.add_argument(
        "--rename-shared",
        action="store_true",
        help="advertise slices as nvidia.com/gpu.shared (whole-GPU nodes keep nvidia.com/gpu)",
    )
    ts.add_argument(
        "--fail-requests-greater-than-one",
        action="store_true",
        help="refuse pods that ask for more than one slice",
    )
    ts.add_argument(
        "--apply",
        action="store_true",
        help="apply through the Kubernetes API and check every node's advertised GPUs",
    )
    ts.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_seconds,
        default=180,
        help="with --apply: how long to wait for the nodes (default 180)",
    )
    ts.add_argument("--context", help="with --apply: the kubeconfig context (default: current)")
    ts.add_argument(
        "--kubeconfig", metavar="FILE", help="with --apply: the kubeconfig (default: $KUBECONFIG)"
    )

    hv = k8s_sub.add_parser(
        "hub-values",
        help="values for the zero-to-jupyterhub Helm chart: profiles, OIDC groups, culling, storage",
    )
    hv.set_defaults(func=_reported(_hub_values))
    hv.add_argument("--profiles", metavar="FILE", required=True, help="the profile file (TOML)")
    hv.add_argument("--out", metavar="FILE", help="write the values here (default: print them)")
    hv.add_argument("--public-url", required=True, help="the hub's https:// address")
    hv.add_argument("--authorize-url", required=True, help="the OIDC authorization endpoint")
    hv.add_argument("--token-url", required=True, help="the OIDC token endpoint")
    hv.add_argument("--userdata-url", required=True, help="the OIDC userinfo endpoint")
    hv.add_argument("--client-id", required=True, help="the OIDC client ID")
    hv.add_argument(
        "--client-secret-name",
        default="gpulane-oidc",
        help="Secret holding the client secret under the key client-secret (default gpulane-oidc)",
    )
    hv.add_argument(
        "--scopes", default="openid,profile,email,groups", help="OIDC scopes, comma-separated"
    )
    hv.add_argument("--username-claim", default="preferred_username")
    hv.add_argument("--groups-claim", default="groups", help="the claim listing a user's groups")
    hv.add_argument(
        "--allowed-groups", metavar="G1,G2", default="", help="only these groups may log in"
    )
    hv.add_argument("--admin-groups", metavar="G1,G2", default="", help="hub admins")
    hv.add_argument("--hub-image", metavar="REGISTRY/NAME:TAG", help="k8s-hub image with gpulane")
    hv.add_argument("--cull-timeout", metavar="SECONDS", type=_seconds, default=3600)
    hv.add_argument("--cull-every", metavar="SECONDS", type=_seconds, default=300)
    hv.add_argument(
        "--start-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=900,
        help="how long a server may wait for a free GPU before giving up (default 900)",
    )
    hv.add_argument("--scratch-size", default="20Gi", help="size limit of the scratch home")
    hv.add_argument("--nfs-server", metavar="HOST", help="NFS server of both persistent tiers")
    hv.add_argument("--home-export", metavar="PATH", help="NFS export holding a folder per user")
    hv.add_argument("--shared-export", metavar="PATH", help="NFS export the team shares")
    hv.add_argument(
        "--home-claim", metavar="PVC", help="instead: a ReadWriteMany PVC per-user tier"
    )
    hv.add_argument("--shared-claim", metavar="PVC", help="instead: a ReadWriteMany PVC, team tier")
    hv.add_argument("--shared-read-only", action="store_true", help="mount ~/shared read-only")
    hv.add_argument("--namespace", default="jhub", help="the hub's namespace (for the RBAC)")
    hv.add_argument(
        "--hub-service-account", default="hub", help="the hub's service account (the chart's)"
    )
    hv.add_argument(
        "--worker-ports",
        metavar="LOW-HIGH",
        type=_ports,
        default=CALLBACK_PORTS,
        help="ports a kernel's %%%%gpu callback listener takes in the user image (its "
        "ip_local_port_range; default 32768-60999): the only ports %%%%gpu worker pods may reach",
    )
    hv.add_argument(
        "--rbac-out",
        metavar="FILE",
        help="write the broker's RBAC and the worker pods' NetworkPolicy here (default with "
        "--out: gpulane-rbac.yaml beside it)",
    )


def _reported(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """The command, its refusals and a missing PyYAML or kubernetes client worded for cli.py."""

    def run(args: argparse.Namespace) -> int:
        from gpulane.admin.k8s_time_slicing import K8sError
        from gpulane.profiles import ProfileError

        try:
            return command(args)
        except (K8sError, ProfileError) as error:
            raise GpulaneError(str(error)) from None
        except ImportError as error:
            raise GpulaneError(
                "the k8s commands need PyYAML and the kubernetes client: "
                f"pip install 'gpulane[k8s]' ({error})"
            ) from None

    return run


def _time_slicing(args: argparse.Namespace) -> int:
    from gpulane.admin.k8s_time_slicing import (
        SHARED_RESOURCE,
        K8sError,
        KubeCluster,
        TimeSlicing,
        apply,
        render,
    )
    from gpulane.profiles import load_profiles_file

    replicas = args.replicas
    if args.profiles:
        pset = load_profiles_file(args.profiles)
        if not args.disable:
            if replicas is None:
                replicas = pset.slices_per_gpu
            if replicas != pset.slices_per_gpu:
                raise K8sError(
                    f"--replicas {replicas} but {args.profiles} says slices_per_gpu = "
                    f"{pset.slices_per_gpu}: the slices' GPU memory shares would not add up"
                )
            shared = pset.slice_resource == SHARED_RESOURCE
            if shared != args.rename_shared:
                raise K8sError(
                    f"{args.profiles} asks for slices as {pset.slice_resource}, so "
                    + ("add --rename-shared" if shared else "leave out --rename-shared")
                )
    if replicas is None and not args.disable:
        raise K8sError("give --replicas N (or --profiles FILE with slices_per_gpu), or --disable")
    plan = TimeSlicing(
        replicas=None if args.disable else replicas,
        namespace=args.namespace,
        configmap=args.configmap,
        rename_shared=args.rename_shared,
        fail_requests_greater_than_one=args.fail_requests_greater_than_one,
    )
    if not args.apply:
        sys.stdout.write(render(plan))
        return 0
    apply(plan, KubeCluster(args.context, args.kubeconfig), wait=float(args.wait))
    print("time-slicing " + (f"on: {plan.replicas} per GPU" if plan.enabled else "off"))
    return 0


def _hub_values(args: argparse.Namespace) -> int:
    from gpulane.admin.k8s_hub_values import HubOptions, render, render_rbac
    from gpulane.profiles import ProfileError, load_profiles_file

    pset = load_profiles_file(args.profiles)
    try:
        text = Path(args.profiles).read_text(encoding="utf-8")
    except OSError as error:
        raise ProfileError(f"cannot read {args.profiles}: {error.strerror}") from None
    options = HubOptions(
        public_url=args.public_url,
        authorize_url=args.authorize_url,
        token_url=args.token_url,
        userdata_url=args.userdata_url,
        client_id=args.client_id,
        client_secret_name=args.client_secret_name,
        scopes=tuple(s.strip() for s in args.scopes.split(",") if s.strip()),
        username_claim=args.username_claim,
        groups_claim=args.groups_claim,
        allowed_groups=_names(args.allowed_groups),
        admin_groups=_names(args.admin_groups),
        hub_image=args.hub_image,
        cull_timeout=args.cull_timeout,
        cull_every=args.cull_every,
        start_timeout=args.start_timeout,
        scratch_size=args.scratch_size,
        nfs_server=args.nfs_server,
        home_export=args.home_export,
        shared_export=args.shared_export,
        home_claim=args.home_claim,
        shared_claim=args.shared_claim,
        shared_read_only=args.shared_read_only,
        namespace=args.namespace,
        hub_service_account=args.hub_service_account,
        worker_ports=args.worker_ports,
    )
    output = render(pset, text, options)
    rbac_out = args.rbac_out or (
        str(Path(args.out).with_name("gpulane-rbac.yaml")) if args.out else None
    )
    if not args.out:
        sys.stdout.write(output)
    for path, content in ((args.out, output), (rbac_out, render_rbac(options))):
        if not path:
            continue
        try:
            Path(path).write_text(content, encoding="utf-8")
        except OSError as error:
            raise ProfileError(f"cannot write {path}: {error.strerror}") from None
        print(f"wrote {path}", file=sys.stderr)
    if not rbac_out:
        print("the broker's RBAC was not written: give --rbac-out FILE", file=sys.stderr)
    return 0


COMMANDS = (("k8s", "JupyterHub on Kubernetes: time-slicing, Helm values", define_k8s),)
