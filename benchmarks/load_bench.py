#!/usr/bin/env python3
"""gpulane broker under load: status latency by queue length, and what a flood costs others.

Against a real ``gpulane broker --simulate-gpus 1`` process, with its queue written
to its store before it starts (so no submission limit is in the way):

- ``/v1/status`` latency with 100, 1,000 and 10,000 queued jobs (one page, keep-alive);
- a second user's heartbeat and submit latency with 1,000 jobs queued, without and
  with a first user flooding status and new event watches from many connections,
  in alternating rounds of the same run, as ratios (flood / quiet); and whether any
  lease expired.

The flooder runs as ``nobody`` (so the broker's per-user limits apply to it, as to any
user); that needs root. The victim is this process. Not a test::

    bash scripts/bench.sh load [--samples 200] [--rounds 2] [--threads 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from gpulane.broker.store import JobRecord, Store
from gpulane.scheduler.http import UnixJSONClient

TARGET_STATUS_MS = 10.0
TARGET_RATIO = 1.2
NOBODY = 65534

_FLOOD = r"""
import json, socket, sys, threading, time
path, seconds, threads, job = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
counts, lock = {}, threading.Lock()
def ask(raw, whole):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(path)
        conn.sendall(raw)
        reply = b""
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
            if not whole:
                break
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
def hammer(n):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if n % 2:
            status = ask(b"GET /v1/status HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n", True)
        else:
            raw = f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: b\r\n\r\n".encode()
            status = ask(raw, False)  # the first event, then leave
        with lock:
            counts[status] = counts.get(status, 0) + 1
workers = [threading.Thread(target=hammer, args=(n,)) for n in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps(counts), flush=True)
"""


class Broker:
    """A broker process in a temporary folder, its queue written before it starts."""

    def __init__(self, queued: int, owner: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="gpulane-load-"))
        self.folder.chmod(0o755)
        self.socket = self.folder / "run" / "broker.sock"
        state = self.folder / "state"
        state.mkdir(mode=0o700)
        store = Store(state / "broker.sqlite3")
        now = time.time()
        for n in range(queued):
            store.insert(
                JobRecord(
                    uid=owner,
                    user=_name(owner),
                    name=f"queued-{n}",
                    gpus=1,
                    slices=0,
                    time_limit=3600,
                    mem=None,
                    command=["python", "train.py", f"--seed={n}"],
                    submitted_at=now + n * 1e-3,
                )
            )
        store.close()
        self.log = self.folder / "broker.log"
        argv = [sys.executable, "-m", "gpulane", "broker", "--simulate-gpus", "1"]
        argv += ["--socket", str(self.socket), "--state-dir", str(state), "--lease-ttl", "1h"]
        argv += ["--max-submits-per-minute", "0"]  # the victim's own submissions are measured
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.client = UnixJSONClient(self.socket)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # listening, and the queue loaded
            with contextlib.suppress(Exception):
                if (
                    self.client.request("GET", "/v1/status?limit=0")["queue_total"] >= queued - 1
                ):  # one is granted
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"broker exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise SystemExit("the broker did not load its queue within 60 s")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(15)
        shutil.rmtree(self.folder, ignore_errors=True)


def _name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


@contextlib.contextmanager
def broker(queued: int, owner: int) -> Iterator[Broker]:
    b = Broker(queued, owner)
    try:
        yield b
    finally:
        b.stop()


def timed(call: object, *args: object) -> float:
    start = time.perf_counter()
    call(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def ms(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1000, xs[int(0.9 * (len(xs) - 1))] * 1000


def status_latency(queued: int, samples: int, owner: int) -> list[float]:
    with broker(queued, owner) as b:
        b.client.request("GET", "/v1/status")  # the first one replays the queue
        return [timed(b.client.request, "GET", "/v1/status") for _ in range(samples)]


def victim_round(b: Broker, samples: int, job: int) -> tuple[list[float], list[float]]:
    beats, submits = [], []
    body = {"command": ["true"], "name": "victim"}
    for _ in range(samples):
        beats.append(timed(b.client.request, "POST", f"/v1/jobs/{job}/heartbeat"))
        start = time.perf_counter()
        extra = b.client.request("POST", "/v1/jobs", body)
        submits.append(time.perf_counter() - start)
        b.client.request("DELETE", f"/v1/jobs/{extra['id']}")  # keep the queue's length
        time.sleep(0.02)
    return beats, submits


def flood_cost(samples: int, rounds: int, threads: int, flooder: int) -> dict[str, object]:
    quiet_beats: list[float] = []
    quiet_submits: list[float] = []
    loud_beats: list[float] = []
    loud_submits: list[float] = []
    counts: dict[str, int] = {}
    with broker(1000, flooder) as b:
        mine = b.client.request("POST", "/v1/jobs", {"command": ["true"], "name": "victim"})
        watched = b.client.request("GET", "/v1/status?limit=1&offset=500")["queue"][0]["id"]
        for _ in range(rounds):
            beats, submits = victim_round(b, samples, mine["id"])
            quiet_beats += beats
            quiet_submits += submits
            seconds = samples * 0.03 + 2  # outlasts the victim's round
            flood = subprocess.Popen(
                [
                    "setpriv",
                    f"--reuid={flooder}",
                    f"--regid={flooder}",
                    "--clear-groups",
                    "--",
                    sys.executable,
                    "-c",
                    _FLOOD,
                    str(b.socket),
                    str(seconds),
                    str(threads),
                    str(watched),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)  # the flood is under way
            beats, submits = victim_round(b, samples, mine["id"])
            loud_beats += beats
            loud_submits += submits
            out, _ = flood.communicate(timeout=seconds + 60)
            for status, n in json.loads(out or "{}").items():
                counts[status] = counts.get(status, 0) + n
        log = b.log.read_text()
        state = b.client.request("GET", f"/v1/jobs/{mine['id']}")["state"]
    return {
        "quiet_beats": quiet_beats,
        "quiet_submits": quiet_submits,
        "loud_beats": loud_beats,
        "loud_submits": loud_submits,
        "counts": counts,
        "expired": log.count("sent no heartbeat"),
        "victim_state": state,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="requests per row and round")
    parser.add_argument("--rounds", type=int, default=2, help="quiet/flood rounds, alternating")
    parser.add_argument("--threads", type=int, default=16, help="the flooder's connections")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("load_bench needs root: the flooder runs as nobody, the victim as root")
        return 2
    print(f"gpulane load benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print()
    print(f"{'queued jobs':>12} | {'status median ms':>16} | {'p90 ms':>8} | target")
    rows = {}
    for queued in (100, 1000, 10_000):
        med, p90 = ms(status_latency(queued, args.samples, NOBODY))
        rows[queued] = med
        mark = "PASS" if med <= TARGET_STATUS_MS else "MISS"
        note = f"<= {TARGET_STATUS_MS:.0f} ms {mark}" if queued == 10_000 else ""
        print(f"{queued:>12} | {med:>16.2f} | {p90:>8.2f} | {note}")
    result = flood_cost(args.samples, args.rounds, args.threads, NOBODY)
    print()
    print(
        f"a second user's latency, 1000 jobs queued, flood of {args.threads} connections "
        "(status and new event watches)"
    )
    print(f"{'metric':<12} | {'quiet ms':>9} {'p90':>7} | {'flood ms':>9} {'p90':>7} | ratio")
    ok = True
    for name in ("beats", "submits"):
        quiet = ms(result[f"quiet_{name}"])  # type: ignore[arg-type]
        loud = ms(result[f"loud_{name}"])  # type: ignore[arg-type]
        ratio = loud[0] / quiet[0]
        ok = ok and ratio <= TARGET_RATIO
        label = "heartbeat" if name == "beats" else "submit"
        print(
            f"{label:<12} | {quiet[0]:>9.2f} {quiet[1]:>7.2f} | {loud[0]:>9.2f} {loud[1]:>7.2f}"
            f" | {ratio:.2f}"
        )
    print(f"flood answers by status: {result['counts']}")
    print(f"leases expired: {result['expired']}; the victim's job: {result['victim_state']}")
    print()
    print("targets:")
    status_ok = rows[10_000] <= TARGET_STATUS_MS
    print(
        f"  status with 10,000 queued <= {TARGET_STATUS_MS:.0f} ms: {rows[10_000]:.2f} ms "
        f"{'PASS' if status_ok else 'MISS'}"
    )
    print(
        f"  heartbeat and submit under a flood <= {TARGET_RATIO:.1f}x quiet, no lease expired: "
        f"{'PASS' if ok and not result['expired'] else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
