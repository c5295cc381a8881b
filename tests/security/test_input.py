"""Findings 8 and 11: malformed input from one user is a one-line 400 and changes nothing.

A real root broker and gpl-alice's raw HTTP on its socket: integers out of their real range
(an exit status of 2**64 once left a job half-finished, its GPU handed to another while it
ran), and bodies that are not a flat JSON object (deep nesting once answered 500 with a
RecursionError traceback).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.security.raw_client import RawClient, one_line_error
from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE = "gpl-alice"


def holders(client: RawClient) -> list[int]:
    status, snapshot = client.request("GET", "/v1/status")
    assert status == 200, snapshot
    return [h["job"] for row in snapshot["gpus"] for h in row["holders"]]


def job_state(client: RawClient, job_id: int) -> str:
    status, view = client.request("GET", f"/v1/jobs/{job_id}")
    assert status == 200, view
    return str(view["state"])


def test_out_of_range_integers_are_refused_and_the_job_keeps_running(make_broker):
    broker = make_broker("--simulate-gpus", "2", "--kill-grace", "1s")
    alice = RawClient(ALICE, broker.socket)
    try:
        status, job = alice.request("POST", "/v1/jobs", {"time_limit": 6, "command": ["true"]})
        assert status == 201 and job["state"] == "running", job
        job_id = job["id"]
        started = time.monotonic()
        bad_exits: list[Any] = [2**64, 2**63, -(2**63) - 1, 256, -256, 1e3, "1", True, None]
        for value in bad_exits:
            status, answer = alice.request(
                "POST", f"/v1/jobs/{job_id}/finish", {"exit_status": value}
            )
            assert status == 400 and one_line_error(answer), (value, status, answer)
            assert job_state(alice, job_id) == "running", value
            assert holders(alice) == [job_id], value
        for value in (0, -1, 2**22 + 1, 2**63, 2**64, -5, "1", 1.0, True):
            status, answer = alice.request("POST", f"/v1/jobs/{job_id}/started", {"pid": value})
            assert status == 400 and one_line_error(answer), (value, status, answer)
        assert job_state(alice, job_id) == "running"
        # Its lease and its time limit are untouched: it still times out, and frees the GPU.
        assert time.monotonic() - started < 6, "the refusals took longer than the time limit"
        wait_for(lambda: job_state(alice, job_id) == "timeout", timeout=20, what="the time limit")
        assert holders(alice) == []
        # The real range still works: a signal's negative status, the shell's 255.
        for value, message in ((-9, "killed by SIGKILL"), (255, "exited with status 255")):
            status, job = alice.request("POST", "/v1/jobs", {"command": ["true"]})
            assert status == 201 and job["state"] == "running", job
            status, done = alice.request(
                "POST", f"/v1/jobs/{job['id']}/finish", {"exit_status": value}
            )
            assert status == 200 and done["state"] == "failed", done
            assert done["exit_status"] == value and done["message"] == message
    finally:
        alice.close()
    assert "Traceback" not in broker.log_text()


DEEP = b'{"command": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

# Each is refused on every POST endpoint; what the body carries is otherwise harmless.
MALFORMED: list[tuple[str, bytes]] = [
    ("deeply nested lists", DEEP),
    ("deeply nested objects", b'{"a":' * 40_000 + b"1" + b"}" * 40_000),
    ("nested 40 deep", b'{"command": ' + b"[" * 40 + b"]" * 40 + b"}"),
    ("not JSON", b"{nope"),
    ("truncated", b'{"command": ["sleep", '),
    ("a list", b'["sleep", "1"]'),
    ("a string", b'"sleep 1"'),
    ("a number", b"7"),
    ("null", b"null"),
    ("NaN", b'{"gpus": NaN, "exit_status": NaN, "pid": NaN}'),
    ("Infinity", b'{"gpus": Infinity, "exit_status": -Infinity, "pid": Infinity}'),
    ("a huge integer", b'{"gpus": ' + b"9" * 5000 + b', "exit_status": ' + b"9" * 5000 + b"}"),
    ("invalid UTF-8", b'{"name": "\xff\xfe", "exit_status": 0, "pid": 1}'),
    ("UTF-16", '{"exit_status": 0, "pid": 1}'.encode("utf-16")),
    ("a lone surrogate", b'{"name": "\\ud800", "command": ["\\ud800"], "zz\\ud800": 1}'),
    ("unknown keys", b'{"exit_status": 0, "pid": 1, "gpus": 1, "surprise": 1}'),
    ("wrong types", b'{"gpus": "1", "command": "sleep 1", "exit_status": [0], "pid": {}}'),
]


def test_malformed_bodies_are_one_line_400s_on_every_post_endpoint(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    alice = RawClient(ALICE, broker.socket)
    try:
        status, held = alice.request("POST", "/v1/jobs", {"name": "held", "command": ["true"]})
        assert status == 201 and held["state"] == "running"
        status, queued = alice.request("POST", "/v1/jobs", {"name": "waits", "command": ["true"]})
        assert status == 201 and queued["state"] == "queued"
        before = alice.request("GET", "/v1/status")[1]
        endpoints = ["/v1/jobs"] + [
            f"/v1/jobs/{job}/{action}"
            for job in (held["id"], queued["id"])
            for action in ("heartbeat", "started", "finish", "cancel")
        ]
        for what, body in MALFORMED:
            for path in endpoints:
                status, answer = alice.send("POST", path, body)
                assert status == 400 and one_line_error(answer), (what, path, status, answer)
        after = alice.request("GET", "/v1/status")[1]
        assert [j["id"] for j in after["queue"]] == [j["id"] for j in before["queue"]]
        assert [j["id"] for j in after["running"]] == [j["id"] for j in before["running"]]
        assert job_state(alice, held["id"]) == "running"
        assert job_state(alice, queued["id"]) == "queued"
        # Well-formed bodies still work on the same connection's neighbours.
        status, answer = alice.request("POST", f"/v1/jobs/{held['id']}/heartbeat")
        assert status == 200, answer
        status, answer = alice.request("POST", f"/v1/jobs/{queued['id']}/cancel", {})
        assert status == 200 and answer["state"] == "cancelled", answer
    finally:
        alice.close()
    log = broker.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert " 500 " not in log, log[-2000:]


def test_the_refusal_names_the_problem(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    alice = RawClient(ALICE, broker.socket)
    try:
        answers = {
            what: alice.send("POST", "/v1/jobs", body)[1]["error"] for what, body in MALFORMED
        }
    finally:
        alice.close()
    assert answers["a list"] == "the request body must be a JSON object"
    assert answers["NaN"] == "the request body is not valid JSON: NaN is not a number"
    assert answers["deeply nested lists"] == answers["nested 40 deep"]
    assert "nested" in answers["nested 40 deep"]
    assert answers["invalid UTF-8"] == "the request body is not valid UTF-8"
    assert json.dumps(answers)  # every message is plain, serialisable text
