"""A fuzz pass over the broker's API: generated requests against one real root broker.

Every endpoint's schema is written out below (methods, paths, ids, query, body shapes);
hypothesis draws requests from it, valid and not: random methods and paths, ids that are
0, negative, huge or not digits, bodies of every JSON type, deep nesting, huge numbers,
NaN, NUL and lone surrogates, invalid UTF-8, oversize bodies, Content-Length lies and
junk Authorization. They go as raw bytes on the broker's Unix socket, from root (the
test process) and from gpl-bob (a relay process running as bob). Asserted for each:
never a 5xx, a refusal is a JSON object with a one-line "error", and a refused request
leaves the queue, the running set and the GPU holders as they were. At the end: no
traceback in the broker's log, and the broker still answers.
"""

from __future__ import annotations

import base64
import json
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.broker import BrokerProcess
from tests.support.users import as_user, user_env

BOB = "gpl-bob"

# Sends one raw request (bytes exactly as given) on a fresh connection and reads the answer.
# Shared by the test process (root) and the relay running as bob.
RAW = r'''
import socket

def exchange(path, data, half_close=False, timeout=3.0):
    """(status or None, headers, body bytes) for raw request bytes on the socket at path."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        try:
            s.sendall(data)
            if half_close:  # a promised body that never comes: say so, don't wait for a timeout
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused before it was all sent (too large): the answer may still be there
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return None, {}, buf  # closed without an answer
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            want = int(headers["content-length"])
            while len(body) < want:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            return status, headers, body[:want]
        if status == 200 and "ndjson" in headers.get("content-type", ""):
            return status, headers, b""  # an event stream: it runs until the job ends
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body
    except socket.timeout:
        return None, {}, b"timeout"
    except OSError as error:  # reset, or refused: no answer, which counts as a refusal
        return None, {}, repr(error).encode()
    finally:
        s.close()
'''
namespace: dict[str, Any] = {}
exec(RAW, namespace)  # the same code runs in the relay
exchange = namespace["exchange"]

RELAY = (
    RAW
    + r"""
import base64, json, sys
path = sys.argv[1]
for line in sys.stdin:
    ask = json.loads(line)
    status, headers, body = exchange(path, base64.b64decode(ask["data"]), ask["half_close"])
    print(json.dumps({"status": status, "headers": headers,
                      "body": base64.b64encode(body).decode()}), flush=True)
"""
)


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes


class Relay:
    """Raw requests sent by a process running as ``user``."""

    def __init__(self, user: str, sock: Path) -> None:
        self.proc = subprocess.Popen(
            as_user(user, [sys.executable, "-c", RELAY, str(sock)]),
            env=user_env(user, sock),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, data: bytes, half_close: bool) -> Answer:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        ask = {"data": base64.b64encode(data).decode(), "half_close": half_close}
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the relay died"
        got = json.loads(line)
        return Answer(got["status"], got["headers"], base64.b64decode(got["body"]))

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@dataclass
class World:
    broker: BrokerProcess
    bob: Relay

    def send(self, user: str, data: bytes, half_close: bool = False) -> Answer:
        if user == BOB:
            return self.bob.send(data, half_close)
        return Answer(*exchange(str(self.broker.socket), data, half_close))

    def call(self, user: str, method: str, path: str, body: Any = None) -> Any:
        payload = b"" if body is None else json.dumps(body).encode()
        answer = self.send(user, http(method, path, payload))
        assert answer.status is not None and answer.status < 300, (path, answer)
        return json.loads(answer.body)

    def jobs(self) -> dict[str, Any]:
        """What a refused request must never change: each user's queue in its order, the
        running set, GPU holders. (How users' queues interleave follows their fair-share
        standing, which moves with time while jobs run, not with requests.)"""
        status = self.call("root", "GET", "/v1/status?limit=1000")
        queues: dict[str, list[tuple[int, str]]] = {}
        for job in status["queue"]:
            queues.setdefault(job["user"], []).append((job["id"], job["state"]))
        return {
            "running": sorted((j["id"], j["user"], j["state"]) for j in status["running"]),
            "queue": queues,
            "queue_total": status.get("queue_total"),
            "holders": sorted(
                (h["job"], h["user"], tuple(h["gpus"]))
                for row in status["gpus"]
                for h in row["holders"]
            ),
        }


def http(
    method: str, target: str, body: bytes, headers: list[tuple[str, str]] | None = None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    if headers is None:
        headers = [("Content-Length", str(len(body)))] if body else []
    lines += [f"{key}: {value}" for key, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


@pytest.fixture(scope="module")
def world(unix_users: tuple[str, ...]) -> Iterator[World]:
    """One broker for the whole pass (started once: hypothesis calls the test many times)."""
    folder = Path(tempfile.mkdtemp(prefix="gpulane-fuzz-"))
    folder.chmod(0o755)  # bob reaches the socket inside
    broker = BrokerProcess(
        folder,
        [
            "--simulate-gpus", "4",
            # Nothing changes on its own while the pass runs: no lease expires, and a job
            # cancelled or past its time limit stays running (ending) for its grace.
            "--lease-ttl", "1h",
            "--kill-grace", "1h",
            "--max-requests-per-second", "0",  # fuzz the handlers, not only the 429
            "--max-submits-per-minute", "0",
        ],
    )  # fmt: skip
    broker.start()
    bob = Relay(BOB, broker.socket)
    world = World(broker, bob)
    try:
        # Jobs in every live state, of both users, for the generated ids to land on.
        for user in ("root", "root", "root", BOB, BOB, "root", BOB, "root"):
            world.call(user, "POST", "/v1/jobs", {"name": f"seed-{user}", "command": ["sleep"]})
        yield world
    finally:
        bob.close()
        broker.stop()
        log = broker.log_text()
        shutil.rmtree(folder, ignore_errors=True)
    assert "Traceback" not in log, around_traceback(log)


def around_traceback(log: str) -> str:
    start = log.find("Traceback")
    return log[max(0, start - 600) : start + 3000]


# ------------------------------------------------------------------ the schema

ACTIONS = ("heartbeat", "started", "finish", "cancel")
INTS = st.one_of(
    st.integers(-3, 12),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400]),
)
# Text with what breaks encoders: NUL, lone surrogates, noncharacters, the top code point.
TEXT = st.text(
    st.one_of(
        st.characters(),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\ufffe", "\U0010ffff", "\n", "/"]),
    ),
    max_size=12,
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=True, allow_infinity=True), TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
JOB_BODY = st.fixed_dictionaries(
    {},
    optional={
        "gpus": INTS | JSON,
        "slices": INTS | JSON,
        "time_limit": INTS | JSON,
        "mem": INTS | JSON,
        "name": TEXT | JSON,
        "command": st.lists(TEXT, max_size=4) | JSON,
        "extra": JSON,
    },
)
PID_BODY = st.fixed_dictionaries({}, optional={"pid": INTS | JSON, "x": JSON})
EXIT_BODY = st.fixed_dictionaries({}, optional={"exit_status": INTS | JSON, "x": JSON})
WEIRD_IDS = st.one_of(
    INTS.map(str),
    st.sampled_from(
        ["0", "-1", "9" * 18, "9" * 19, "1" * 40, "abc", "1.5", "0x1", "%31", "", "01"]
    ),
)
IDS = st.one_of(st.integers(1, 30).map(str), WEIRD_IDS)  # mostly jobs that exist
PATH_CHARS = string.ascii_letters + string.digits + "/-._~%?&=+:;@!$'()*,"
QUERIES = st.one_of(
    st.just(""),
    st.builds(
        "?{}={}".format,
        st.sampled_from(["offset", "limit", "x"]),
        st.one_of(INTS.map(str), st.text("0123456789abc%-+.", max_size=12)),
    ),
)
NO_BODY = st.one_of(st.just({}), st.dictionaries(TEXT, JSON, max_size=2))
# The schema: every endpoint, its method, its path and the shape of its body.
ENDPOINTS: list[tuple[str, str, st.SearchStrategy[Any]]] = [
    ("GET", "/v1/health", NO_BODY),
    ("GET", "/v1/status", NO_BODY),
    ("POST", "/v1/jobs", JOB_BODY),
    ("GET", "/v1/jobs/{}", NO_BODY),
    ("DELETE", "/v1/jobs/{}", NO_BODY),
    ("GET", "/v1/jobs/{}/events", NO_BODY),
    ("POST", "/v1/jobs/{}/heartbeat", NO_BODY),
    ("POST", "/v1/jobs/{}/started", PID_BODY),
    ("POST", "/v1/jobs/{}/finish", EXIT_BODY),
    ("POST", "/v1/jobs/{}/cancel", NO_BODY),
]
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]),
    st.text(string.ascii_uppercase, min_size=1, max_size=8),
)
RANDOM_PATHS = st.one_of(
    st.sampled_from(["/v1/jobs/", "/", "/v1", "/v1/jobs//events", "/v2/health"]),
    st.builds("/v1/jobs/{}/{}".format, IDS, st.sampled_from(["nope", "", "events/x", "Cancel"])),
    st.text(PATH_CHARS, max_size=30).map(lambda tail: "/" + tail),
)


def encoded(value: Any) -> st.SearchStrategy[bytes]:
    """One value as bytes: plain JSON, or raw UTF-8 (where lone surrogates are invalid)."""
    return st.sampled_from(
        [
            json.dumps(value).encode(),
            json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"),
        ]
    )


MALFORMED = st.one_of(
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.builds(
        lambda key: b'{"%s": ' % key + b"9" * 5000 + b"}",
        st.sampled_from([b"exit_status", b"pid", b"gpus"]),
    ),
    st.sampled_from(
        [b"NaN", b'{"pid": NaN}', b'{"gpus": Infinity}', b"\xff\xfe{}", b"{", b"[]", b"null"]
    ),
    st.binary(max_size=64),
    st.just(b" " * 300_000 + b"{}"),  # over the body limit
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, bool, str]:
    """(user, raw request bytes, whether the body was cut short, what it was for the report)."""
    if draw(st.integers(0, 4)):  # four in five follow the schema, with values valid or not
        method, template, shape = draw(st.sampled_from(ENDPOINTS))
        path = template.format(draw(IDS)) + draw(QUERIES)
        body = draw(
            st.one_of(shape.flatmap(encoded), shape.flatmap(encoded), st.just(b""), MALFORMED)
        )
    else:
        method = draw(METHODS)
        path = draw(st.one_of(RANDOM_PATHS, st.sampled_from([e[1].format(1) for e in ENDPOINTS])))
        body = draw(st.one_of(st.just(b""), JSON.flatmap(encoded), MALFORMED))
    length = draw(st.sampled_from(["exact"] * 6 + ["none", "short", "long", "junk"]))
    headers: list[tuple[str, str]] = []
    cut = False
    if length == "exact" and body:
        headers.append(("Content-Length", str(len(body))))
    elif length == "short" and body:
        headers.append(("Content-Length", str(draw(st.integers(0, len(body) - 1)))))
    elif length == "long":
        headers.append(("Content-Length", str(len(body) + draw(st.integers(1, 1000)))))
        cut = True
    elif length == "junk":
        junk = ["abc", "-1", "1e3", " 5", "99999999999999999999", "", "0x10", "1,2"]
        headers.append(("Content-Length", draw(st.sampled_from(junk))))
        cut = True  # where the server reads a number past the body (" 5"), it waits for more
    if not draw(st.integers(0, 3)):
        token = draw(st.text(string.printable.strip("\r\n\x0b\x0c"), max_size=40))
        scheme = draw(st.sampled_from(["token ", "Bearer ", "Basic ", "", "token"]))
        headers.append(("Authorization", scheme + token))
    if not draw(st.integers(0, 3)):
        kind = ["application/json", "text/plain", "multipart/form-data; boundary=x", "", "*/*"]
        headers.append(("Content-Type", draw(st.sampled_from(kind))))
    user = draw(st.sampled_from(["root", BOB]))
    summary = f"{user} {method} {path} {length} body[{len(body)}]={body[:80]!r}"
    return user, http(method, path, body, headers), cut, summary


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # no .hypothesis folder left in the tree
)
@given(requests())
def test_generated_requests_never_break_the_broker(
    world: World, request_drawn: tuple[str, bytes, bool, str]
) -> None:
    user, data, cut, summary = request_drawn
    before = world.jobs()
    answer = world.send(user, data, half_close=cut)
    assert answer.status is None or answer.status < 500, (summary, answer)
    if answer.status is None or answer.status >= 400:
        if answer.status is not None and not data.startswith(b"HEAD "):
            refusal = json.loads(answer.body)
            assert isinstance(refusal, dict) and isinstance(refusal.get("error"), str), summary
            assert "\n" not in refusal["error"], (summary, refusal)
        assert world.jobs() == before, summary  # refused: nothing changed


def test_the_broker_still_answers_after_the_pass(world: World) -> None:
    assert world.call(BOB, "GET", "/v1/health")["ok"] is True
    log = world.broker.log_text()
    assert "Traceback" not in log, around_traceback(log)
