"""``gpulane demo queue``: a broker with one simulated GPU and two users queueing with ``gpulane run``.

As root it creates two demo users (gpl-demo-ada, gpl-demo-ben) so the broker
sees two real identities; otherwise both jobs run as you.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpulane.config import SOCKET_ENV
from gpulane.demo.users import ensure_user

DEMO_USERS = ("gpl-demo-ada", "gpl-demo-ben")


def _client(user: str | None, sock: Path, args: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "gpulane", *args]
    if user is None:
        return argv
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]


_seen: list[str] = []  # every relayed line, in the order it arrived


def _relay(label: str, stream: object) -> None:
    for line in stream:  # type: ignore[attr-defined]
        _seen.append(line)
        print(f"  {label:>4} | {line.rstrip()}", flush=True)


def _first(prefix: str) -> int:
    return next((i for i, line in enumerate(_seen) if line.startswith(prefix)), len(_seen))


def _start(label: str, user: str | None, sock: Path, args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, **{SOCKET_ENV: str(sock)}, HOME="/tmp", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        _client(user, sock, args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    threading.Thread(target=_relay, args=(label, proc.stdout), daemon=True).start()
    return proc


def _training(name: str, seconds: float) -> list[str]:
    code = (
        "import os, time\n"
        f"for epoch in range(3):\n"
        f"    print('{name}: epoch', epoch, 'on GPU', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
        f"    time.sleep({seconds / 3:.3f})\n"
    )
    return [sys.executable, "-c", code]


def run_demo(seconds: float = 3.0) -> int:
    # The first job must still hold the GPU when the other two are queued (about 1.2 s in).
    seconds = max(seconds, 2.0)
    folder = Path(tempfile.mkdtemp(prefix="gpulane-demo-"))
    folder.chmod(0o755)
    sock = folder / "run" / "broker.sock"
    users: list[str | None] = [None, None]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        for user in DEMO_USERS:
            ensure_user(user)
        users = list(DEMO_USERS)
    names = [u or pwd.getpwuid(os.geteuid()).pw_name for u in users]
    print(f"gpulane demo: a broker with 1 simulated GPU at {sock}")
    print(f"  users: {names[0]} (ada) and {names[1]} (ben)\n")
    broker = subprocess.Popen(
        [sys.executable, "-m", "gpulane", "broker", "--simulate-gpus", "1", "--socket", str(sock),
         "--state-dir", str(folder / "state"), "--default-time", "5m", "--log-level", "WARNING"],
    )  # fmt: skip
    try:
        _wait_for_socket(sock, broker)
        ada1 = _start(
            "ada",
            users[0],
            sock,
            ["run", "--name", "ada-train", "--time", "2m", "--", *_training("ada", seconds)],
        )
        time.sleep(0.8)
        ada2 = _start(
            "ada",
            users[0],
            sock,
            ["run", "--name", "ada-eval", "--", *_training("ada-eval", seconds)],
        )
        time.sleep(0.4)
        ben = _start(
            "ben", users[1], sock, ["run", "--name", "ben-train", "--", *_training("ben", seconds)]
        )
        time.sleep(0.6)
        print("\n$ gpulane status", flush=True)
        status = subprocess.run(_client(None, sock, ["status"]), env=dict(os.environ, **{SOCKET_ENV: str(sock)}),
                                capture_output=True, text=True)  # fmt: skip
        print(status.stdout or status.stderr, flush=True)
        codes = [p.wait(timeout=60 + 3 * seconds) for p in (ada1, ada2, ben)]
        time.sleep(0.1)
        if names[0] == names[1]:
            print("\n(run as root to see two real users and fair share between them)")
        elif _first("ben: epoch 0") < _first("ada-eval: epoch 0"):
            print("\nben's one job ran before ada's second, submitted earlier: fair share serves")
            print("the user with less recent GPU time.")
        else:
            print(
                "\nada's second job ran before ben's: not what fair share should do; see the broker log."
            )
        return 0 if codes == [0, 0, 0] else 1
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_socket(sock: Path, broker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if broker.poll() is not None:
            raise SystemExit("gpulane demo: the broker did not start")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("gpulane demo: the broker did not listen within 15 s")
