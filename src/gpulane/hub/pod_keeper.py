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
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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


def follow(
    core: Any,
    serialize: Any,
    namespace: str,
    name: str,
    uid: str,
    seen: Callable[[dict[str, Any] | None], None] = lambda pod: None,
) -> str:
    """Return, with the reason, once the pod is over; API errors are retried, not fatal.
    ``seen`` is called with each state of the pod read (None: it is gone)."""
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
                seen(None)
                return "the pod is gone"
            seen(pod)
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
                changed = serialize(event["object"])
                if (changed.get("metadata") or {}).get("name") == name:
                    seen(None if event["type"] == "DELETED" else changed)
                if event_ends(event["type"], changed, name, uid):
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


def delete_secret(core: Any, namespace: str, name: str) -> None:
    """A worker's key goes with its pod (its owner reference would too, later)."""
    from kubernetes.client.exceptions import ApiException

    try:
        core.delete_namespaced_secret(name, namespace, _request_timeout=30)
    except ApiException as error:
        if error.status != 404:
            raise


def exit_status(pod: Mapping[str, Any] | None) -> int:
    """A worker pod's end as an exit status: its container's, 0 for Succeeded, else 1."""
    status = (pod or {}).get("status") or {}
    for entry in status.get("containerStatuses") or []:
        ended = (entry.get("state") or {}).get("terminated")
        if ended and isinstance(ended.get("exitCode"), int):
            return int(ended["exitCode"]) & 0xFF
    return 0 if status.get("phase") == "Succeeded" else 1


class Phases:
    """A worker pod's keeper tells the broker each new phase, one JSON line on stdout."""

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None
        self._said = ""

    def seen(self, pod: dict[str, Any] | None) -> None:
        from gpulane.broker.worker_pods import phase_text

        if pod is not None:
            self.last = pod
        text = phase_text(pod)
        if text != self._said:
            self._said = text
            try:
                sys.stdout.write(json.dumps({"phase": text}) + "\n")
                sys.stdout.flush()
            except OSError:
                pass  # the broker restarted: the phase is only shown, never needed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpulane.hub.pod_keeper")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--uid", default="", help="the pod's uid (a successor is not followed)")
    parser.add_argument(
        "--worker-secret",
        default="",
        help="a %%%%gpu worker pod: its key's Secret; phases go to stdout, the exit status is "
        "the container's, and the pod and the Secret are deleted when it ends",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpulane pod keeper: %(message)s")
    worker = bool(args.worker_secret)
    if not worker:
        core, serialize = core_api()
    # After the imports: a revoke that arrives while importing is a plain SIGTERM (no pod
    # to follow yet either; the hub deletes a pod whose start failed). A worker pod exists
    # already: its keeper takes a revoke from here on (the broker holds one sent earlier
    # until the keeper's first line).
    signal.signal(signal.SIGTERM, _revoked)
    signal.signal(signal.SIGINT, _revoked)
    where = f"{args.namespace}/{args.pod}"
    phases = Phases()
    status = 0
    try:
        if worker:
            core, serialize = core_api()
        why = follow(
            core, serialize, args.namespace, args.pod, args.uid, phases.seen if worker else _no_op
        )
        log.info("%s: %s; the GPU lease ends", where, why)
        status = exit_status(phases.last) if worker else 0
    except Revoked:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("%s: the GPU lease was revoked; deleting the pod", where)
        if worker:
            core, serialize = core_api()  # (again, if the revoke came while it was made)
        delete_pod(core, args.namespace, args.pod, args.uid)
        status = 143 if worker else 0
    else:
        if worker:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            delete_pod(core, args.namespace, args.pod, args.uid)  # a finished pod lingers
    if worker:
        delete_secret(core, args.namespace, args.worker_secret)
    return status


def _no_op(pod: dict[str, Any] | None) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
