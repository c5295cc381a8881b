"""Parsing Slurm's output (recorded from slurm-wlm 22.05) into gpulane's views."""

from __future__ import annotations

import pytest

from gpulane.scheduler import slurm_parse as sp

# squeue -h -t PD,R,CG,CF,S -o <SQUEUE_FORMAT> --sort=-p,i, recorded on the test cluster
SQUEUE = """\
12|RUNNING|gpl-alice|4294901757|gres:gpu:1|0:41|0:19|1:00|2026-11-24T04:40:02|None|vm|gpu|gpulane-3f2a|gpulane:overtime
14|PENDING|gpl-bob|4294901755|gres:gpu:1|0:00|1:00:00|1:00:00|2026-11-24T04:41:02|Resources||gpu|gpulane-77aa|gpulane:stream
15|PENDING|gpl-carol|4294901754|gres/shard:2|0:00|1:00:00|1:00:00|N/A|Priority||gpu||name|with|pipes
16|PENDING|gpl-carol|4294901753|N/A|0:00|1-02:00:00|1-02:00:00|N/A|QOSMaxGRESPerUser||cpu||plain
17_[1-3]|PENDING|gpl-bob|1|N/A|0:00|1:00|1:00|N/A|None||gpu||array
"""


def test_squeue_rows() -> None:
    rows = sp.parse_squeue(SQUEUE)
    assert [r.job_id for r in rows] == [12, 14, 15, 16]  # array ids are not ours: skipped
    running, pending, shard, cpu = rows
    assert running.state == "RUNNING" and running.elapsed == 41 and running.remaining == 19
    assert (
        running.gpu_request == ("gpu", 1)
        and running.nodes == "vm"
        and running.comment == "gpulane-3f2a"
    )
    assert pending.start is not None and pending.reason == "Resources"
    assert (
        shard.gpu_request == ("shard", 2)
        and shard.name == "name|with|pipes"
        and shard.start is None
    )
    assert cpu.gpu_request is None and cpu.time_limit == 26 * 3600


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:41", 41),
        ("1:00:00", 3600),
        ("1-02:00:00", 93600),
        ("UNLIMITED", None),
        ("N/A", None),
        ("", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert sp.parse_slurm_time(text) == seconds


def test_scontrol_job_record() -> None:
    text = (
        "JobId=12 JobName=gpulane:overtime UserId=gpl-alice(1001) GroupId=gpl-alice(1001) "
        "JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 RunTime=00:01:02 TimeLimit=00:01:00"
    )
    record = sp.parse_key_values(text)
    assert record["JobState"] == "TIMEOUT" and record["UserId"] == "gpl-alice(1001)"
    assert sp.gpulane_state(record["JobState"]) == "timeout"
    assert (
        sp.final_message("TIMEOUT", "0:15", "01:00")
        == "GPU time limit 01:00 reached; ask for more with --time"
    )


@pytest.mark.parametrize(
    ("state", "code", "ours", "words"),
    [
        ("COMPLETED", "0:0", "completed", ""),
        ("FAILED", "3:0", "failed", "exited with status 3"),
        ("OUT_OF_MEMORY", "0:125", "failed", "ran out of host memory; ask for more with --mem"),
        ("NODE_FAIL", "0:0", "failed", "the node running it failed; run the cell again"),
        ("CANCELLED by 1001", "0:15", "cancelled", "cancelled (scancel by uid 1001)"),
    ],
)
def test_final_states_in_plain_words(state: str, code: str, ours: str, words: str) -> None:
    assert sp.gpulane_state(state) == ours
    assert sp.final_message(state, code, "01:00") == words


def test_sacct_and_exit_codes() -> None:
    assert sp.parse_sacct("TIMEOUT|0:15\n") == ("TIMEOUT", "0:15")
    assert sp.parse_sacct("") is None
    assert sp.exit_status("3:0") == 3 and sp.exit_status("0:9") == 137 and sp.exit_status("x") == 1


def test_reasons_in_plain_words() -> None:
    assert sp.reason_text("Resources") == "waiting for GPUs to free up"
    assert (
        sp.reason_text("(QOSMaxGRESPerUser)")
        == "you already use the most GPUs your QOS allows per user"
    )
    assert sp.reason_text("SomethingNew") == "SomethingNew"
