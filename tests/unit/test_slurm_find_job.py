"""Finding our own srun job in squeue: the marker comment is public, so the owner decides."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from gpulane.scheduler.slurm import SlurmScheduler, _me

MARKER = "gpulane-0123456789abcdef"


def test_a_copied_marker_on_another_users_job_is_not_ours(tmp_path: Path) -> None:
    # squeue as Slurm prints it (--sort=-p,i): another user's copy of our marker, with a
    # higher fair-share priority, comes first.
    rows = [
        f"31|PENDING|mallory|4294901790|gres:gpu:1|0:00|1:00|1:00|N/A|Priority||gpu|{MARKER}|x",
        f"30|PENDING|{_me()}|4294901757|gres:gpu:1|0:00|1:00|1:00|N/A|Priority||gpu|{MARKER}|y",
    ]
    (tmp_path / "rows").write_text("\n".join(rows) + "\n")
    squeue = tmp_path / "squeue"
    squeue.write_text(f"#!/bin/sh\nexec cat {tmp_path / 'rows'}\n")
    squeue.chmod(0o755)
    scheduler = SlurmScheduler(env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    srun = subprocess.Popen(["sleep", "30"])
    relay: Any = None  # read only once srun has ended; it has not
    try:
        assert scheduler._find_job(MARKER, srun, relay) == 30
    finally:
        srun.kill()
        srun.wait()
