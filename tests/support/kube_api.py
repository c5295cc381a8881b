"""A small stateful Kubernetes API on loopback, for the real ``kubernetes`` client.

No API server can be installed on the test machines. This one keeps core/v1 objects
(pods, nodes, secrets, services, configmaps), apps/v1 daemonsets, networking.k8s.io/v1
networkpolicies and the GPU Operator's nvidia.com/v1 clusterpolicies in memory and serves
what gpulane and KubeSpawner use:
create, get, list (all namespaces too, with a label selector), merge-patch, replace (PUT),
delete (with the garbage collector's part: objects whose ownerReferences name the deleted
one's uid are deleted too) and watch (ADDED/MODIFIED/DELETED after a resourceVersion);
``/version``; and
access reviews (SelfSubjectAccessReview, SubjectAccessReview) answered from
:attr:`Store.grants`. It checks no schema (unit tests validate objects with
kubernetes-validate) and authenticates no one: every request is :data:`SELF`, loopback,
tests only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

NAMESPACED = {
    "pods": "Pod",
    "secrets": "Secret",
    "services": "Service",
    "configmaps": "ConfigMap",
    "daemonsets": "DaemonSet",
    "networkpolicies": "NetworkPolicy",
}
CLUSTER = {"nodes": "Node", "clusterpolicies": "ClusterPolicy"}
KINDS = {**NAMESPACED, **CLUSTER}
# The API group/version each kind is served under ("v1": the core group, under /api).
GROUPS = {
    "daemonsets": "apps/v1",
    "clusterpolicies": "nvidia.com/v1",
    "networkpolicies": "networking.k8s.io/v1",
}
REVIEWS = {"selfsubjectaccessreviews", "subjectaccessreviews"}
SELF = "loopback-admin"  # who every request is, for access reviews
ANY = "*"
VERSION = {"major": "1", "minor": "30", "gitVersion": "v1.30.0-loopback",
           "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
           "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"}  # fmt: skip


class Store:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, type, kind, obj)
        self.version = 0
        self.changed = threading.Condition()
        # user -> {(verb, resource)}; ANY matches any verb or resource. The caller (SELF) may
        # do everything and ask about others unless a test says otherwise.
        self.grants: dict[str, set[tuple[str, str]]] = {SELF: {(ANY, ANY)}}

    def _record(self, kind: str, event: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.events.append((self.version, event, kind, copy.deepcopy(obj)))
        self.changed.notify_all()
        return copy.deepcopy(obj)

    def put(self, kind: str, namespace: str, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.changed:
            metadata = obj.setdefault("metadata", {})
            name = metadata.get("name") or f"{metadata.get('generateName', 'obj-')}{self.version}"
            key = (kind, namespace, name)
            if key in self.objects:
                return 409, status(409, "AlreadyExists", f'{kind} "{name}" already exists')
            metadata.update(name=name, uid=f"uid-{self.version}")
            if kind in NAMESPACED:
                metadata["namespace"] = namespace
            obj.setdefault("apiVersion", GROUPS.get(kind, "v1"))
            obj.setdefault("kind", KINDS[kind])
            if kind == "pods":
                obj.setdefault("status", {"phase": "Pending"})
            self.objects[key] = obj
            return 201, self._record(kind, "ADDED", obj)

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> Any:
        with self.changed:
            obj = self.objects.get((kind, namespace, name))
            if obj is None:
                return 404, status(404, "NotFound", f'{kind} "{name}" not found')
            merge(obj, body)
            return 200, self._record(kind, "MODIFIED", obj)

    def replace(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> Any:
        with self.changed:
            old = self.objects.get((kind, namespace, name))
            if old is None:
                return 404, status(404, "NotFound", f'{kind} "{name}" not found')
            body.setdefault("metadata", {}).update(name=name, uid=old["metadata"]["uid"])
            if kind in NAMESPACED:
                body["metadata"]["namespace"] = namespace
            body.setdefault("apiVersion", old["apiVersion"])
            body.setdefault("kind", old["kind"])
            self.objects[(kind, namespace, name)] = body
            return 200, self._record(kind, "MODIFIED", body)

    def allowed(self, user: str, verb: str, resource: str) -> bool:
        return any(
            v in (ANY, verb) and r in (ANY, resource) for v, r in self.grants.get(user, set())
        )

    def review(self, kind: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """An access review: may spec.user (or the caller, for a self review) do this?"""
        spec = body.get("spec") or {}
        attributes = spec.get("resourceAttributes") or {}
        user = SELF
        if kind == "subjectaccessreviews":
            if not self.allowed(SELF, "create", kind):
                return 403, status(403, "Forbidden", f"cannot create {kind}")
            user = str(spec.get("user", ""))
        verb, resource = str(attributes.get("verb", "")), str(attributes.get("resource", ""))
        return 201, {**body, "status": {"allowed": self.allowed(user, verb, resource)}}

    def delete(self, kind: str, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        with self.changed:
            obj = self.objects.pop((kind, namespace, name), None)
            if obj is None:
                return 404, status(404, "NotFound", f'{kind} "{name}" not found')
            deleted = self._record(kind, "DELETED", obj)
            # The garbage collector: what the deleted object owns goes with it (background).
            uid = obj["metadata"].get("uid")
            for key, other in list(self.objects.items()):
                owners = other["metadata"].get("ownerReferences") or []
                if key[1] == namespace and any(o.get("uid") == uid for o in owners):
                    self.delete(*key)
            return 200, deleted

    def select(self, kind: str, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        with self.changed:
            return [
                copy.deepcopy(obj)
                for (k, ns, _), obj in self.objects.items()
                if k == kind and namespace in (None, ns) and matches(obj, selector)
            ]


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 merge patch (what ``patch_namespaced_*`` sends for a dict body)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def matches(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if key.endswith("!"):
            if labels.get(key[:-1]) == value:
                return False
        elif (value and labels.get(key) != value) or (not value and key not in labels):
            return False
    return True


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}  # fmt: skip


def make_handler(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def route(self) -> tuple[str, str | None, str | None, dict[str, list[str]]]:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            query = parse_qs(url.query)
            if parts[:2] == ["api", "v1"]:
                group, rest = "v1", parts[2:]
            elif parts[:1] == ["apis"] and len(parts) >= 4:
                group, rest = "/".join(parts[1:3]), parts[3:]
            else:
                raise LookupError(url.path)
            if rest[:1] == ["namespaces"] and len(rest) >= 3:
                namespace, rest = rest[1], rest[2:]
            else:
                namespace = None
            if not rest or (rest[0] not in KINDS and rest[0] not in REVIEWS):
                raise LookupError(url.path)
            if rest[0] in KINDS and GROUPS.get(rest[0], "v1") != group:
                raise LookupError(url.path)
            return rest[0], namespace, rest[1] if len(rest) > 1 else None, query

        def send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            loaded: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
            return loaded

        def handle_one(self, method: str) -> None:
            if method == "GET" and urlparse(self.path).path.rstrip("/") == "/version":
                self.send(200, VERSION)
                return
            try:
                kind, namespace, name, query = self.route()
            except LookupError as error:
                self.send(404, status(404, "NotFound", f"no such path {error}"))
                return
            ns = namespace or ""
            if kind in REVIEWS:
                if method != "POST":
                    self.send(405, status(405, "MethodNotAllowed", "reviews are created only"))
                else:
                    self.send(*store.review(kind, self.body()))
            elif method == "POST":
                self.send(*store.put(kind, ns, self.body()))
            elif method == "PATCH":
                self.send(*store.patch(kind, ns, name or "", self.body()))
            elif method == "PUT":
                self.send(*store.replace(kind, ns, name or "", self.body()))
            elif method == "DELETE":
                self.body()  # DeleteOptions (read, so the kept-alive connection stays in step)
                self.send(*store.delete(kind, ns, name or ""))
            elif name is not None:
                found = store.select(kind, namespace if kind in NAMESPACED else None, "")
                hit = [o for o in found if o["metadata"]["name"] == name]
                if hit:
                    self.send(200, hit[0])
                else:
                    self.send(404, status(404, "NotFound", f'{kind} "{name}" not found'))
            elif query.get("watch", [""])[0] in ("true", "1"):
                self.watch(kind, namespace, query)
            else:
                selector = query.get("labelSelector", [""])[0]
                items = store.select(kind, namespace, selector)
                self.send(200, {"kind": f"{KINDS[kind]}List", "apiVersion": GROUPS.get(kind, "v1"),
                                "metadata": {"resourceVersion": str(store.version)},
                                "items": items})  # fmt: skip

        def watch(self, kind: str, namespace: str | None, query: dict[str, list[str]]) -> None:
            since = int(query.get("resourceVersion", ["0"])[0] or 0)
            timeout = min(float(query.get("timeoutSeconds", ["30"])[0]), 300.0)
            selector = query.get("labelSelector", [""])[0]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            import time

            deadline = time.monotonic() + timeout
            with store.changed:
                while True:
                    for rv, event, k, obj in store.events:
                        ns = obj["metadata"].get("namespace")
                        if rv <= since or k != kind or namespace not in (None, ns):
                            continue
                        since = rv
                        if matches(obj, selector):
                            line = json.dumps({"type": event, "object": obj}).encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    store.changed.wait(left)
            self.wfile.write(b"0\r\n\r\n")

        def do_GET(self) -> None:
            self.handle_one("GET")

        def do_POST(self) -> None:
            self.handle_one("POST")

        def do_PATCH(self) -> None:
            self.handle_one("PATCH")

        def do_PUT(self) -> None:
            self.handle_one("PUT")

        def do_DELETE(self) -> None:
            self.handle_one("DELETE")

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (a watch closed early) is routine, not an error to print.
        pass


KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: loopback
  cluster: {{server: "{url}"}}
users:
- name: tests
  user: {{token: loopback-only}}
contexts:
- name: loopback
  context: {{cluster: loopback, user: tests, namespace: default}}
current-context: loopback
"""


@contextmanager
def kube_api(folder: Path) -> Iterator[tuple[Store, Path]]:
    """Serve a fresh API on a free loopback port; yields the store and a kubeconfig for it."""
    store = Store()
    server = Server(("127.0.0.1", 0), make_handler(store))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.format(url=f"http://127.0.0.1:{server.server_port}"))
    kubeconfig.chmod(0o600)
    try:
        yield store, kubeconfig
    finally:
        server.shutdown()
        server.server_close()


def gpu_node(name: str, gpus: int, ready: bool = True) -> dict[str, Any]:
    """A node as the GPU operator leaves it: allocatable nvidia.com/gpu and GFD's labels."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true"}},
        "status": {
            "capacity": {"nvidia.com/gpu": str(gpus)},
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def kill_keepers(kubeconfig: Path) -> list[int]:
    """SIGKILL the pod keepers on this API (found by the KUBECONFIG in their environment),
    as a hub pod restart kills them; returns their pids."""
    marker = f"KUBECONFIG={kubeconfig}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (
                not entry.name.isdigit()
                or b"gpulane.hub.pod_keeper" not in (entry / "cmdline").read_bytes()
            ):
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed
