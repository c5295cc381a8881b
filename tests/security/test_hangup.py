"""A client that pipelines requests and hangs up costs the broker nothing (found by the fuzz pass).

The broker once read the caller's identity from the connection's socket when each
request was handled; a second pipelined request, handled after the client had closed,
found no socket and answered 500 with an AttributeError traceback. Credentials are now
read once, at accept.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.users import as_user

pytestmark = pytest.mark.usefixtures("unix_users")

HANG_UP = """
import socket, sys
request = b"DELETE /v1/jobs/ HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Length: 0\\r\\n\\r\\n"
for _ in range(200):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(request * 2)  # two requests in one write, then gone
    s.close()
"""


def test_pipelined_requests_then_a_hang_up_leave_no_traceback(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    subprocess.run(
        as_user("gpl-bob", [sys.executable, "-c", HANG_UP, str(broker.socket)]),
        check=True,
        timeout=60,
    )
    health = broker.call("gpl-alice", "status")
    assert health.returncode == 0, health.stderr
    log = broker.log_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
