"""`gpulane slurm config`: render_config on fixed machines, fact parsing, and the command."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from gpulane.admin import slurm_config
from gpulane.admin.slurm_config import ConfigOptions, MachineFacts, render_config
from gpulane.cli import build_parser, dispatch
from gpulane.errors import ConfigError

# A GPU server: 2 sockets x 16 cores x 2 threads, 4 GPUs, cgroup v2, systemd.
SERVER = MachineFacts(
    hostname="gpu01",
    cpus=64,
    sockets=2,
    cores_per_socket=16,
    threads_per_core=2,
    memory_mb=515_000,
    gpu_files=("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3"),
    gpu_names=("NVIDIA A100-SXM4-80GB",) * 4,
    gpu_source="nvml",
    cgroup2_controllers=("cpuset", "cpu", "io", "memory", "pids"),
    bpf=True,
    systemd=True,
)
# A workstation in a container: cgroup v1/hybrid, no systemd, one GPU.
HYBRID = MachineFacts(
    hostname="ws",
    cpus=2,
    sockets=1,
    cores_per_socket=2,
    threads_per_core=1,
    memory_mb=24103,
    gpu_files=("/dev/nvidia0",),
    gpu_source="/dev",
    cgroup2_controllers=None,
    bpf=True,
)
# WSL2 on a laptop: NVML answers through /usr/lib/wsl/lib, no /dev/nvidiaN.
LAPTOP_WSL = MachineFacts(
    hostname="DESKTOP-1",
    cpus=16,
    sockets=1,
    cores_per_socket=8,
    threads_per_core=2,
    memory_mb=32000,
    gpu_files=("/dev/nvidia0",),
    gpu_names=("NVIDIA GeForce RTX 4090",),
    wsl=True,
    cgroup2_controllers=("cpuset", "cpu", "memory"),
    bpf=True,
    systemd=True,
)


def settings(text: str) -> list[str]:
    """Non-comment, non-empty lines."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def value(text: str, key: str) -> str:
    found = [line.split("=", 1)[1] for line in settings(text) if line.startswith(f"{key}=")]
    assert len(found) == 1, (key, found)
    return found[0]


def test_server_whole_gpus_with_cgroup_v2_device_confinement():
    files = render_config(SERVER, ConfigOptions())
    assert set(files) == {"slurm.conf", "gres.conf", "cgroup.conf"}
    conf = files["slurm.conf"]
    assert value(conf, "ClusterName") == "gpulane"
    assert value(conf, "SlurmctldHost") == "gpu01(127.0.0.1)"
    assert value(conf, "SlurmctldPort") == "6817"
    assert value(conf, "SlurmdPort") == "6818"
    assert value(conf, "SlurmUser") == "slurm"
    assert value(conf, "GresTypes") == "gpu"
    assert value(conf, "ProctrackType") == "proctrack/cgroup"
    assert value(conf, "TaskPlugin") == "task/cgroup"
    assert value(conf, "SelectType") == "select/cons_tres"
    # Debian's places (the packaged systemd units expect these pid files).
    assert value(conf, "StateSaveLocation") == "/var/lib/slurm/slurmctld"
    assert value(conf, "SlurmdSpoolDir") == "/var/lib/slurm/slurmd"
    assert value(conf, "SlurmctldPidFile") == "/run/slurmctld.pid"
    assert value(conf, "SlurmdLogFile") == "/var/log/slurm/slurmd.log"
    assert "AuthInfo=" not in conf
    node = [line for line in settings(conf) if line.startswith("NodeName=")]
    assert node == [
        "NodeName=gpu01 NodeAddr=127.0.0.1 CPUs=64 Boards=1 SocketsPerBoard=2 CoresPerSocket=16 "
        "ThreadsPerCore=2 RealMemory=463500 Gres=gpu:4 State=UNKNOWN"
    ]
    assert "PartitionName=gpu Nodes=gpu01 Default=YES MaxTime=INFINITE State=UP" in conf
    assert settings(files["gres.conf"]) == [
        "AutoDetect=off",
        "NodeName=gpu01 Name=gpu File=/dev/nvidia0",
        "NodeName=gpu01 Name=gpu File=/dev/nvidia1",
        "NodeName=gpu01 Name=gpu File=/dev/nvidia2",
        "NodeName=gpu01 Name=gpu File=/dev/nvidia3",
    ]
    assert "# GPU 0: NVIDIA A100-SXM4-80GB" in files["gres.conf"]
    # systemd is PID 1, so IgnoreSystemd stays off.
    assert settings(files["cgroup.conf"]) == [
        "CgroupPlugin=cgroup/v2",
        "ConstrainDevices=yes",
        "ConstrainCores=no",
        "ConstrainRAMSpace=no",
    ]


def test_scheduler_settings_that_shorten_handoff_are_there_with_their_reasons():
    conf = render_config(SERVER, ConfigOptions())["slurm.conf"]
    assert value(conf, "Epilog") == "/bin/true"
    assert (
        value(conf, "SchedulerParameters") == "sched_interval=1,bf_interval=1,batch_sched_delay=0"
    )
    assert value(conf, "KillWait") == "2"
    assert value(conf, "CompleteWait") == "0"
    # The comment right above Epilog says why it matters.
    lines = conf.splitlines()
    above = lines[lines.index("Epilog=/bin/true") - 4 : lines.index("Epilog=/bin/true")]
    assert any("EPILOG_COMPLETE" in line for line in above), above


def test_shards_per_gpu_add_shard_gres_per_gpu():
    files = render_config(SERVER, ConfigOptions(shards_per_gpu=4))
    conf = files["slurm.conf"]
    assert value(conf, "GresTypes") == "gpu,shard"
    assert " Gres=gpu:4,shard:16 " in conf
    shard_lines = [line for line in settings(files["gres.conf"]) if "Name=shard" in line]
    assert shard_lines == [
        f"NodeName=gpu01 Name=shard Count=4 File=/dev/nvidia{i}" for i in range(4)
    ]


def test_no_cgroup_v2_means_no_device_confinement_and_says_why():
    files = render_config(HYBRID, ConfigOptions())
    conf, cgroup = files["slurm.conf"], files["cgroup.conf"]
    assert value(conf, "ProctrackType") == "proctrack/linuxproc"
    assert value(conf, "TaskPlugin") == "task/none"
    assert value(cgroup, "ConstrainDevices") == "no"
    assert "not a unified cgroup v2 hierarchy" in cgroup
    assert "cgroup/v2" not in cgroup
    assert "found as /dev/nvidia[0-9]*" in files["gres.conf"]
    assert " RealMemory=21692 " in conf  # 90% of 24103 MiB


def test_cgroup_v2_without_bpf_or_systemd():
    no_bpf = render_config(replace(SERVER, bpf=False), ConfigOptions())
    assert value(no_bpf["cgroup.conf"], "ConstrainDevices") == "no"
    assert "eBPF" in no_bpf["cgroup.conf"]
    assert value(no_bpf["slurm.conf"], "TaskPlugin") == "task/none"
    no_systemd = render_config(replace(SERVER, systemd=False), ConfigOptions())
    assert value(no_systemd["cgroup.conf"], "IgnoreSystemd") == "yes"
    assert value(no_systemd["cgroup.conf"], "ConstrainDevices") == "yes"


def test_wsl2_explicit_files_autodetect_off_and_wsl_notes():
    files = render_config(LAPTOP_WSL, ConfigOptions())
    gres = files["gres.conf"]
    assert settings(gres) == ["AutoDetect=off", "NodeName=DESKTOP-1 Name=gpu File=/dev/nvidia0"]
    assert "/dev/dxg" in gres
    assert "mknod -m 666 /dev/nvidia0 c 195 0" in gres
    assert "/usr/lib/wsl/lib" in gres
    # cgroup v2 is there, but WSL's one /dev/dxg leaves nothing per GPU to fence off.
    assert value(files["cgroup.conf"], "ConstrainDevices") == "no"
    assert "WSL2" in files["cgroup.conf"]


def test_wsl_option_forces_the_wsl_layout():
    files = render_config(SERVER, ConfigOptions(wsl=True))
    assert "/usr/lib/wsl/lib" in files["gres.conf"]
    assert value(files["cgroup.conf"], "ConstrainDevices") == "no"


def test_state_log_port_user_and_munge_socket_overrides():
    options = ConfigOptions(
        cluster_name="lab",
        partition="interactive",
        port=7001,
        state_dir="/srv/slurm",
        log_dir="/srv/log",
        slurm_user="root",
        munge_socket="/srv/munge/sock",
        extra_comments=("Generated with: gpulane slurm config --out /srv/conf",),
    )
    conf = render_config(HYBRID, options)["slurm.conf"]
    assert value(conf, "ClusterName") == "lab"
    assert value(conf, "SlurmctldPort") == "7001"
    assert value(conf, "SlurmdPort") == "7002"
    assert value(conf, "SlurmUser") == "root"
    assert value(conf, "AuthInfo") == "socket=/srv/munge/sock"
    assert value(conf, "StateSaveLocation") == "/srv/slurm/slurmctld"
    assert value(conf, "SlurmdSpoolDir") == "/srv/slurm/slurmd"
    assert value(conf, "SlurmctldPidFile") == "/srv/slurm/slurmctld.pid"
    assert value(conf, "SlurmdPidFile") == "/srv/slurm/slurmd.pid"
    assert value(conf, "SlurmctldLogFile") == "/srv/log/slurmctld.log"
    assert "PartitionName=interactive Nodes=ws " in conf
    assert "# Generated with: gpulane slurm config --out /srv/conf" in conf.splitlines()


def test_no_gpus_is_a_one_line_error_naming_the_option():
    with pytest.raises(ConfigError) as error:
        render_config(replace(HYBRID, gpu_files=()), ConfigOptions())
    assert "--gpu-devices" in str(error.value)
    assert len(str(error.value).splitlines()) == 1


# --------------------------------------------------------------------------- facts


def test_cpu_topology_from_a_sysfs_tree(tmp_path: Path):
    # 2 sockets x 2 cores x 2 threads: CPUs 4-7 are the second threads of CPUs 0-3.
    layout = {
        0: (0, 0),
        1: (0, 1),
        2: (1, 0),
        3: (1, 1),
        4: (0, 0),
        5: (0, 1),
        6: (1, 0),
        7: (1, 1),
    }
    for cpu, (package, core) in layout.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    (tmp_path / "online").write_text("0-7\n")
    assert slurm_config.cpu_topology(tmp_path) == (8, 2, 2, 2)
    (tmp_path / "online").write_text("0-3\n")  # SMT switched off
    assert slurm_config.cpu_topology(tmp_path) == (4, 2, 2, 1)
    (tmp_path / "online").write_text("garbage")
    assert slurm_config.cpu_topology(tmp_path)[0] == os.cpu_count()


def test_cpu_topology_on_this_machine_matches_os_count():
    cpus, sockets, cores, threads = slurm_config.cpu_topology()
    assert cpus == len(os.sched_getaffinity(0)) or cpus == os.cpu_count()
    assert sockets * cores * threads == cpus


def test_parse_cpu_list_memory_and_wsl():
    assert slurm_config.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert slurm_config.memory_mb("MemTotal:       24682416 kB\nMemFree: 1 kB\n") == 24103
    assert slurm_config.is_wsl("Linux version 5.15.153.1-microsoft-standard-WSL2 (gcc)")
    assert not slurm_config.is_wsl("Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)")


def test_cgroup2_controllers(tmp_path: Path):
    assert slurm_config.cgroup2_controllers(tmp_path) is None
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert slurm_config.cgroup2_controllers(tmp_path) == ("cpuset", "cpu", "io", "memory", "pids")


# --------------------------------------------------------------------------- the command


def parse(*argv: str) -> argparse.Namespace:
    """cli.py's parser; run the result with cli.dispatch."""
    return build_parser().parse_args(list(argv))


def fake_devices(folder: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = folder / f"gpu{i}"
        if os.geteuid() == 0:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        else:
            path.symlink_to("/dev/null")  # a character device too, for os.stat
        paths.append(str(path))
    return paths


def test_command_writes_files_and_records_how_it_was_generated(tmp_path: Path, capsys):
    devices = fake_devices(tmp_path, 2)
    out = tmp_path / "etc"
    args = parse(
        "slurm", "config", "--out", str(out), "--gpu-devices", ",".join(devices),
        "--shards-per-gpu", "3", "--state-dir", str(tmp_path / "state"),
        "--log-dir", str(tmp_path / "log"), "--port", "7100",
    )  # fmt: skip
    assert dispatch(args) == 0
    conf = (out / "slurm.conf").read_text()
    assert " Gres=gpu:2,shard:6 " in conf
    assert (
        f"NodeName={slurm_config.short_hostname()} Name=gpu File={devices[1]}"
        in (out / "gres.conf").read_text()
    )
    assert (out / "cgroup.conf").exists()
    assert (tmp_path / "state" / "slurmctld").is_dir() and (tmp_path / "log").is_dir()
    assert oct((out / "slurm.conf").stat().st_mode & 0o777) == "0o644"
    generated = next(line for line in conf.splitlines() if line.startswith("# Generated with: "))
    assert generated.startswith(f"# Generated with: gpulane slurm config --out {out} ")
    assert "--shards-per-gpu 3" in generated and "--port 7100" in generated
    assert f"--gpu-devices {devices[0]},{devices[1]}" in generated
    assert "wrote" in capsys.readouterr().err


def test_command_prints_all_three_files_without_out(tmp_path: Path, capsys):
    devices = fake_devices(tmp_path, 1)
    assert dispatch(parse("slurm", "config", "--gpu-devices", devices[0])) == 0
    out = capsys.readouterr().out
    for name in ("slurm.conf", "gres.conf", "cgroup.conf"):
        assert f"# ===== {name} =====" in out


def test_command_errors_are_one_line(tmp_path: Path, capsys, monkeypatch):
    regular = tmp_path / "notadevice"
    regular.write_text("")
    assert dispatch(parse("slurm", "config", "--gpu-devices", str(regular))) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"gpulane: --gpu-devices: {regular}: not a character device "
        "(a GPU's device file, like /dev/nvidia0, is one)"
    )
    # No NVML, no /dev/nvidia*, no option: the error names the option.
    monkeypatch.setattr(slurm_config, "nvml_gpus", lambda wsl: ([], []))
    monkeypatch.setattr(slurm_config, "dev_nvidia_files", lambda: [])
    assert dispatch(parse("slurm", "config")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--gpu-devices" in err
    with pytest.raises(SystemExit) as exit_:
        parse("slurm", "config", "--shards-per-gpu", "-2")
    assert exit_.value.code == 2
    assert "--shards-per-gpu: expected 0 or more" in capsys.readouterr().err


def fake_pynvml(minors: list[int], fail: Exception | None = None) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's pynvml with GPUs at the given device minors."""
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        if fail is not None:
            raise fail
        calls.append("init")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(minors)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    module.nvmlDeviceGetMinorNumber = lambda h: minors[h]  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_gpus_from_nvml_use_device_minor_numbers(monkeypatch):
    nvml = fake_pynvml([0, 2])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    files, names = slurm_config.nvml_gpus(wsl=False)
    assert files == ["/dev/nvidia0", "/dev/nvidia2"]
    assert names == ["NVIDIA H100 80GB HBM3"] * 2
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    # WSL2 has no minors: the placeholder files follow NVML's index.
    assert slurm_config.nvml_gpus(wsl=True)[0] == ["/dev/nvidia0", "/dev/nvidia1"]
    facts = slurm_config.gather_facts()
    assert facts.gpu_source == "nvml" and facts.gpu_files == ("/dev/nvidia0", "/dev/nvidia2")
    assert facts.memory_mb > 0 and facts.cpus >= 1 and facts.hostname


def test_without_nvml_gpus_come_from_dev_nvidia(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], RuntimeError("no driver")))
    assert slurm_config.nvml_gpus(wsl=False) == ([], [])
    monkeypatch.setattr(slurm_config, "dev_nvidia_files", lambda: ["/dev/nvidia0"])
    facts = slurm_config.gather_facts()
    assert facts.gpu_source == "/dev" and facts.gpu_files == ("/dev/nvidia0",)
