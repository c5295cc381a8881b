"""The process that stands for a Kubernetes GPU server in the broker: it lives as long as the pod.

The broker's leases follow processes (a pidfd on the client, then on a detached
job's command). A pod is not a process of the hub's machine, so the Kubernetes
spawner starts this one as the lease's command once the pod runs: it follows the
pod through the API and exits when the pod is deleted, replaced or has finished,
which ends the lease; it outlives the hub process, so a hub restart keeps the lease.
When the broker revokes the lease (its time limit, an admin's cancel) it is sent
SIGTERM and deletes the pod, so the GPU really is given back.

    python -m gpulane.hub.pod_keeper --namespace NS --pod NAME --uid UID

Credentials come from the hub's service account (or ``$KUBECONFIG``), never argv.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from gpulane.broker.k8s_capacity import core_api

log = logging.getLogger("gpulane.pod_keeper")

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
WATCH_SECONDS = 300  # one watch request; then the pod is read again and a new watch starts
MAX_BACKOFF = 30.0  # the API server restarting: try again at most this far apart
DELETE_GRACE = 10  # seconds the server gets to stop when its lease is revoked


class Revoked(Exception):
    """SIGTERM: the broker (or the hub) ends the lease."""


def pod_ended(pod: Mapping[str, Any] | None, uid: str) -> bool:
    """Whether the pod this lease stands for is over: gone, replaced, or finished.

    A pod being deleted (``deletionTimestamp``) still holds its GPU until it is gone.
    """
    if pod is None:
        return True
    if uid and (pod.get("metadata") or {}).get("uid") != uid:
        return True  # a new pod of the same name is another server, not this lease's
    return (pod.get("status") or {}).get("phase") in FINISHED_PHASES


def event_ends(event_type: str, pod: Mapping[str, Any], name: str, uid: str) -> bool:
    """Whether one watch event ends the lease (events of other pods never do)."""
    metadata = pod.get("metadata") or {}
    if metadata.get("name") != name:
        return False
    if event_type == "DELETED":
        return not uid or metadata.get("uid") == uid
    return pod_ended(pod, uid)


def follow(core: Any, serialize: Any, namespace: str, name: str, uid: str) -> str:
    """Return, with the reason, once the pod is over; API errors are retried, not fatal."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    backoff = 1.0
    while True:
        try:
            try:
                pod = serialize(core.read_namespaced_pod(name, namespace, _request_timeout=30))
            except ApiException as error:
                if error.status != 404:
                    raise
                return "the pod is gone"
            if pod_ended(pod, uid):
                return f"the pod is {pod.get('status', {}).get('phase', 'replaced')}"
            if backoff == 1.0:
                log.info("%s/%s: following the pod for its GPU lease", namespace, name)
            version = pod["metadata"].get("resourceVersion")
            stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                core.list_namespaced_pod,
                namespace,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=WATCH_SECONDS,
            )
            for event in stream:
                if event["type"] == "ERROR":
                    break  # an expired resourceVersion: read the pod again
                if event_ends(event["type"], serialize(event["object"]), name, uid):
                    return f"the pod was {event['type'].lower()}"
            backoff = 1.0
        except Revoked:
            raise
        except Exception as error:  # the API server may be restarting: the pod may not be
            log.warning("pod %s/%s not read (trying again): %s", namespace, name, error)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


def delete_pod(core: Any, namespace: str, name: str, uid: str) -> None:
    from kubernetes.client import V1DeleteOptions, V1Preconditions
    from kubernetes.client.exceptions import ApiException

    options = V1DeleteOptions(
        grace_period_seconds=DELETE_GRACE,
        preconditions=V1Preconditions(uid=uid) if uid else None,  # never a successor pod
    )
    try:
        core.delete_namespaced_pod(name, namespace, body=options, _request_timeout=30)
    except ApiException as error:
        if error.status not in (404, 409):
            raise


def _revoked(signum: int, frame: FrameType | None) -> None:
    raise Revoked


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpulane.hub.pod_keeper")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--uid", default="", help="the pod's uid (a successor is not followed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpulane pod keeper: %(message)s")
    core, serialize = core_api()
    # After the imports: a revoke that arrives while importing is a plain SIGTERM (no pod
    # to follow yet either; the hub deletes a pod whose start failed).
    signal.signal(signal.SIGTERM, _revoked)
    signal.signal(signal.SIGINT, _revoked)
    where = f"{args.namespace}/{args.pod}"
    try:
        why = follow(core, serialize, args.namespace, args.pod, args.uid)
        log.info("%s: %s; the GPU lease ends", where, why)
    except Revoked:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("%s: the GPU lease was revoked; deleting the pod", where)
        delete_pod(core, args.namespace, args.pod, args.uid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
