"""`gpulane slurm config` and `gpulane doctor` against a real one-node Slurm.

One cluster for the module, started from the config `gpulane slurm config` writes (fake
GPU character devices, a free port, state and logs in a temporary folder) with its own
munged on a private socket (AuthInfo=socket=...), so stopping munge here never touches
the machine's munged or another test's cluster. Each test leaves the cluster healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from gpulane.admin import doctor
from gpulane.admin.doctor import Context, Finding
from gpulane.admin.slurm_commands import PYTHON_PREFIXES_ENV
from gpulane.cli import build_parser, dispatch
from tests.support.users import need, wait_for

GPUS = 2
SHARDS_PER_GPU = 2


def parse(*argv: str) -> argparse.Namespace:
    """cli.py's parser; run the result with cli.dispatch."""
    return build_parser().parse_args(list(argv))


def free_port_pair() -> int:
    """A port P with P and P+1 free (slurmctld, slurmd); never 6817, which others use."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        if port in (6817, 6818) or port > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", port))
                b.bind(("", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def pid_from(path: Path, name: str) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if name.encode() in cmdline else None


def stop_pid(pid: int | None, timeout: float = 10) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and _comm(pid) not in ("", "(zombie)"):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def _comm(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    return "(zombie)" if "\nState:\tZ" in status else status.split("\n", 1)[0]


@dataclass
class PrivateMunge:
    """A munged of this module's own: own key, socket, pid, log and seed files."""

    folder: Path

    @property
    def socket(self) -> Path:
        return self.folder / "munge.sock"

    def start(self) -> None:
        munge = pwd.getpwnam("munge")
        key = self.folder / "munge.key"
        if not key.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.folder.chmod(0o755)  # clients must reach the socket
            os.chown(self.folder, munge.pw_uid, munge.pw_gid)
            key.write_bytes(os.urandom(1024))
            os.chown(key, munge.pw_uid, munge.pw_gid)
            key.chmod(0o400)
        f = self.folder
        subprocess.run(
            ["runuser", "-u", "munge", "--", "munged", f"--socket={self.socket}",
             f"--key-file={key}", f"--pid-file={f / 'munged.pid'}",
             f"--log-file={f / 'munged.log'}", f"--seed-file={f / 'munged.seed'}"],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        wait_for(self.works, 10, what="the private munged to answer")

    def works(self) -> bool:
        return doctor.munge_roundtrip(str(self.socket), 5)[0]

    def pid(self) -> int | None:
        return pid_from(self.folder / "munged.pid", "munged")

    def stop(self) -> None:
        stop_pid(self.pid())


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    node: str
    munge: PrivateMunge

    @property
    def conf(self) -> Path:
        return self.folder / "etc" / "slurm.conf"

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def state(self) -> str:
        result = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", timeout=15)
        return result.stdout.strip()

    def wait_state(self, wanted: str, timeout: float = 30) -> None:
        wait_for(lambda: self.state() == wanted, timeout, what=f"node state {wanted!r}")

    def start_daemons(self, clean: bool = True) -> None:
        self.run("slurmctld", *(["-c"] if clean else []), timeout=30).check_returncode()
        self.run("slurmd", timeout=30).check_returncode()

    def stop_daemons(self) -> None:
        state = self.folder / "state"
        stop_pid(pid_from(state / "slurmd.pid", "slurmd"))
        stop_pid(pid_from(state / "slurmctld.pid", "slurmctld"))

    def findings(self, **context: object) -> dict[str, Finding]:
        """Run every doctor check against this cluster (systemd off: fixes name the daemons)."""
        ctx = replace(Context.from_environment(env=self.env), systemd=False, **context)
        return {f.name: f for f in doctor.run_checks(ctx)}

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / "log" / name
            text = path.read_text(errors="replace") if path.exists() else "(missing)"
            parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-15:]))
        return "\n".join(parts)


def write_config(folder: Path, port: int, munge: PrivateMunge) -> list[str]:
    """`gpulane slurm config` for the test cluster; returns its argv."""
    devices = folder / "dev"
    devices.mkdir(exist_ok=True)
    files = []
    for i in range(GPUS):
        dev = devices / f"gpu{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        files.append(str(dev))
    argv = [
        "slurm", "config", "--out", str(folder / "etc"), "--gpu-devices", ",".join(files),
        "--shards-per-gpu", str(SHARDS_PER_GPU), "--cluster-name", "gpldoctor",
        "--port", str(port), "--state-dir", str(folder / "state"),
        "--log-dir", str(folder / "log"), "--slurm-user", "root",
        "--munge-socket", str(munge.socket),
    ]  # fmt: skip
    assert dispatch(parse(*argv)) == 0
    return argv


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    need(os.geteuid() == 0, "a real Slurm cluster needs root")
    try:
        from tools import slurmlocal

        slurmlocal.ensure_packages()  # installs slurm-wlm and munge where they are missing
    except Exception as error:
        need(False, f"slurm-wlm and munge are not installed and could not be ({error})")
    need(shutil.which("munged") is not None, "munged is missing")
    folder = Path(tempfile.mkdtemp(prefix="gpulane-doctor-"))
    folder.chmod(0o755)
    munge = PrivateMunge(folder / "munge")
    cluster = None
    try:
        munge.start()
        write_config(folder, free_port_pair(), munge)
        cluster = Cluster(
            folder,
            dict(os.environ, SLURM_CONF=str(folder / "etc" / "slurm.conf")),
            socket.gethostname().split(".")[0],
            munge,
        )
        cluster.start_daemons()
        try:
            cluster.wait_state("idle")
        except AssertionError:
            pytest.fail(
                f"the generated config did not bring up an idle node:\n{cluster.log_tail()}"
            )
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop_daemons()
        munge.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The cluster as every test expects it: munge up, node idle."""
    if not cluster.munge.works():
        cluster.munge.start()
    if cluster.state() != "idle":
        cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=resume")
        cluster.wait_state("idle")
    return cluster


# --------------------------------------------------------------------------- slurm config


def test_generated_config_brings_up_a_node_that_runs_gpu_jobs(healthy: Cluster):
    conf = healthy.conf.read_text()
    assert "Epilog=/bin/true" in conf and "AuthInfo=socket=" in conf
    node = healthy.run("scontrol", "show", "node", healthy.node, "-o").stdout
    assert f"Gres=gpu:{GPUS},shard:{GPUS * SHARDS_PER_GPU} " in node
    one = healthy.run("srun", "--gres=gpu:1", "printenv", "CUDA_VISIBLE_DEVICES")
    assert one.returncode == 0, one.stderr + healthy.log_tail()
    assert one.stdout.strip() == "0"
    both = healthy.run("srun", "--gres=gpu:2", "printenv", "CUDA_VISIBLE_DEVICES")
    assert both.returncode == 0 and both.stdout.strip() == "0,1", both.stderr
    shard = healthy.run("srun", "--gres=shard:1", "true")
    assert shard.returncode == 0, shard.stderr


# --------------------------------------------------------------------------- doctor


def test_healthy_cluster_passes_every_slurm_check(healthy: Cluster, monkeypatch, capsys):
    findings = healthy.findings()
    for name in doctor.SLURM_CHECKS:
        assert findings[name].status == "ok", findings[name]
        assert findings[name].fix == ""
    assert findings["scontrol ping"].message.endswith("is UP")
    # The command: JSON with every finding, exit status 1 exactly when one failed.
    monkeypatch.setenv("SLURM_CONF", str(healthy.conf))
    code = dispatch(parse("doctor", "--json"))
    report = json.loads(capsys.readouterr().out)
    names = [f["name"] for f in report["findings"]]
    assert names == [*doctor.SLURM_CHECKS, "gpu devices", "nvml", "cuda libs"]
    assert all(set(f) == {"name", "status", "message", "fix"} for f in report["findings"])
    failed = [f for f in report["findings"] if f["status"] == "fail"]
    assert code == (1 if failed else 0) and report["ok"] == (not failed)
    assert all(f["status"] == "ok" for f in report["findings"] if f["name"] in doctor.SLURM_CHECKS)


def test_munged_stopped_fails_munge_with_the_restart_command(healthy: Cluster):
    healthy.munge.stop()
    try:
        findings = healthy.findings()
        munge = findings["munge"]
        assert munge.status == "fail"
        assert str(healthy.munge.socket) in munge.message
        assert munge.fix == f"runuser -u munge -- munged --socket={healthy.munge.socket}"
        assert findings["munged"].status == "fail"
        # Slurm's own RPCs fail too, and say munge is the cause.
        assert findings["scontrol ping"].status == "fail"
        assert findings["scontrol ping"].fix == munge.fix
    finally:
        healthy.munge.start()
    assert healthy.findings()["munge"].status == "ok"


def test_drained_node_fails_with_reason_and_the_resume_fix(healthy: Cluster):
    drain = healthy.run(
        "scontrol", "update", f"nodename={healthy.node}", "state=drain", "reason=test"
    )
    assert drain.returncode == 0, drain.stderr
    try:
        node = healthy.findings()["node"]
        assert node.status == "fail"
        assert "DRAIN" in node.message and "Reason=test" in node.message
        assert node.fix == f"scontrol update nodename={healthy.node} state=resume"
        # The fix, run as printed, brings the node back.
        fixed = healthy.run(*shlex.split(node.fix))
        assert fixed.returncode == 0, fixed.stderr
        healthy.wait_state("idle")
        assert healthy.findings()["node"].status == "ok"
    finally:
        healthy.run("scontrol", "update", f"nodename={healthy.node}", "state=resume")


def gpulane_shim(folder: Path) -> Path:
    """A `gpulane` on PATH that runs this Python's gpulane."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "gpulane"
    shim.write_text(
        f"#!{sys.executable}\nimport sys\nfrom gpulane.cli import main\nsys.exit(main())\n"
    )
    shim.chmod(0o755)
    return bin_dir


def test_more_gpus_configured_than_device_files_is_invalid_reg_with_a_working_fix(
    healthy: Cluster,
):
    conf = healthy.conf.read_text()
    good = f" Gres=gpu:{GPUS},shard:{GPUS * SHARDS_PER_GPU} "
    assert good in conf
    # slurm.conf now claims a third GPU; gres.conf names the two device files there are.
    healthy.conf.write_text(
        conf.replace(good, f" Gres=gpu:{GPUS + 1},shard:{GPUS * SHARDS_PER_GPU} ")
    )
    try:
        healthy.stop_daemons()
        healthy.start_daemons()
        healthy.wait_state("inval")
        findings = healthy.findings()
        node = findings["node"]
        assert node.status == "fail"
        assert "INVALID_REG" in node.message
        assert (
            f"gres/gpu count reported lower than configured ({GPUS} < {GPUS + 1})" in node.message
        )
        assert node.fix.startswith(f"gpulane slurm config --out {healthy.conf.parent} ")
        assert "scontrol shutdown" in node.fix
        assert node.fix.endswith(f"scontrol update nodename={healthy.node} state=resume")
        gres = findings["gres"]
        assert gres.status == "fail"
        assert f"configures gpu:{GPUS + 1}" in gres.message and f"lists {GPUS}" in gres.message
        # The fix, run as printed (regenerate, restart both daemons, resume), heals it.
        env = dict(healthy.env, PATH=f"{gpulane_shim(healthy.folder)}:{os.environ['PATH']}")
        fixed = subprocess.run(
            ["bash", "-c", node.fix], env=env, capture_output=True, text=True, timeout=60
        )
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr + healthy.log_tail()
        healthy.wait_state("idle")
        assert healthy.conf.read_text() == conf
        after = healthy.findings()
        assert after["node"].status == "ok" and after["gres"].status == "ok", after
    finally:
        if healthy.conf.read_text() != conf or healthy.state() != "idle":
            healthy.conf.write_text(conf)
            healthy.stop_daemons()
            healthy.start_daemons()
            healthy.wait_state("idle")


def test_gres_conf_naming_a_missing_device_file(tmp_path: Path):
    """gres.conf lists more GPUs than device files exist: slurmd would wait, then exit."""
    (tmp_path / "gpu0").symlink_to("/dev/null")
    (tmp_path / "slurm.conf").write_text("NodeName=n1 CPUs=2 Gres=gpu:2 State=UNKNOWN\n")
    (tmp_path / "gres.conf").write_text(
        f"AutoDetect=off\nNodeName=n1 Name=gpu File={tmp_path}/gpu[0-1]\n"
    )
    ctx = Context.from_environment(env={"SLURM_CONF": str(tmp_path / "slurm.conf")})
    ctx = replace(ctx, hostname="n1", systemd=False)
    gres = doctor.check_gres(ctx)
    assert gres.status == "fail"
    assert f"{tmp_path}/gpu1, which does not exist" in gres.message
    assert "can't stat gres.conf file" in gres.message
    assert gres.fix.startswith(f"gpulane slurm config --out {tmp_path}")
    # Count= that does not match File= makes slurmd exit as well.
    (tmp_path / "gres.conf").write_text(f"NodeName=n1 Name=gpu Count=2 File={tmp_path}/gpu0\n")
    assert "count does not match File value" in doctor.check_gres(ctx).message


# --------------------------------------------------------------------------- CUDA libraries


def fake_pip_prefix(root: Path) -> tuple[Path, Path]:
    site_packages = root / "lib" / "python3.11" / "site-packages"
    cudnn = site_packages / "nvidia" / "cudnn" / "lib"
    nccl = site_packages / "nvidia" / "nccl" / "lib"
    for folder, name in ((cudnn, "libcudnn.so.9"), (nccl, "libnccl.so.2")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"")
    (site_packages / "nvidia" / "cudnn" / "__init__.py").write_text("")
    return cudnn, nccl


def test_pip_cuda_libs_off_the_loader_path_warn_with_the_ld_so_conf_fix(tmp_path: Path):
    cudnn, nccl = fake_pip_prefix(tmp_path / "env")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ctx = Context.from_environment(python_prefixes=[tmp_path / "env"], env=env)
    finding = doctor.check_cuda_libs(ctx)
    assert finding.status == "warn"
    assert "libcudnn.so.9" in finding.message and "libnccl.so.2" in finding.message
    assert str(cudnn.resolve()) in finding.message
    assert finding.fix == (
        f"printf '%s\\n' {cudnn.resolve()} {nccl.resolve()} "
        "> /etc/ld.so.conf.d/gpulane-pip-nvidia.conf && ldconfig"
    )
    # The fix writes one folder per line; LD_LIBRARY_PATH with them has the same effect.
    printed = subprocess.run(
        ["bash", "-c", finding.fix.split(" > ")[0]], capture_output=True, text=True, check=True
    )
    assert printed.stdout.splitlines() == [str(cudnn.resolve()), str(nccl.resolve())]
    env["LD_LIBRARY_PATH"] = f"{cudnn}:{nccl}"
    ctx = Context.from_environment(python_prefixes=[tmp_path / "env"], env=env)
    assert doctor.check_cuda_libs(ctx).status == "ok"


def test_doctor_command_takes_python_prefixes_from_option_or_environment(
    tmp_path: Path, monkeypatch, capsys
):
    fake_pip_prefix(tmp_path / "env")
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "absent" / "slurm.conf"))
    for argv, environ in (
        (["doctor", "--json", "--python-prefix", str(tmp_path / "env")], ""),
        (["doctor", "--json"], str(tmp_path / "env")),
    ):
        monkeypatch.setenv(PYTHON_PREFIXES_ENV, environ)
        assert dispatch(parse(*argv)) == 1  # no slurm.conf there: failures
        report = json.loads(capsys.readouterr().out)
        cuda = next(f for f in report["findings"] if f["name"] == "cuda libs")
        assert cuda["status"] == "warn" and "libcudnn.so.9" in cuda["message"]
        conf = next(f for f in report["findings"] if f["name"] == "slurm.conf")
        assert conf["status"] == "fail" and "No such file" in conf["message"]
    # The text report: one line per finding, the fix indented under it.
    assert dispatch(parse("doctor")) == 1
    text = capsys.readouterr().out
    assert re.search(r"^FAIL\s+slurm\.conf\s+cannot read .*slurm\.conf", text, re.MULTILINE)
    assert re.search(r"^\s+fix: gpulane slurm config --out ", text, re.MULTILINE)


# --------------------------------------------------------------------------- pure parts


def test_scontrol_oneliner_and_node_findings():
    line = (
        "NodeName=vm Arch=x86_64 CoresPerSocket=2 Gres=gpu:2,shard:4 OS=Linux 6.1 #1 SMP "
        "RealMemory=21692 State=IDLE+DRAIN ThreadsPerCore=1 Partitions=gpu "
        "Reason=test [root@2026-01-01T00:00:00]"
    )
    fields = doctor.parse_scontrol_oneliner(line)
    assert fields["OS"] == "Linux 6.1 #1 SMP"
    assert fields["Reason"] == "test [root@2026-01-01T00:00:00]"
    ctx = replace(Context.from_environment(env={"SLURM_CONF": "/nonexistent"}), systemd=True)
    assert doctor.node_finding(ctx, fields).fix == "scontrol update nodename=vm state=resume"
    down = doctor.node_finding(
        ctx, {"NodeName": "vm", "State": "DOWN+NOT_RESPONDING", "Reason": "Not responding"}
    )
    assert down.fix == "systemctl restart slurmd && scontrol update nodename=vm state=resume"
    inval = doctor.node_finding(ctx, {"NodeName": "vm", "State": "UNKNOWN+DRAIN+INVALID_REG"})
    assert "systemctl restart slurmctld slurmd" in inval.fix
    assert doctor.node_finding(ctx, {"NodeName": "vm", "State": "MIXED"}).status == "ok"
    assert doctor.gpu_count("gpu:a100:2(S:0),shard:8") == 2
    assert doctor.expand_hostlist("/dev/nvidia[0-1,3]") == [
        "/dev/nvidia0",
        "/dev/nvidia1",
        "/dev/nvidia3",
    ]


def test_nvml_check_reads_gpus_or_names_the_driver_fix(monkeypatch):
    def fake(fail: str | None) -> types.ModuleType:
        module = types.ModuleType("pynvml")

        def init() -> None:
            if fail:
                raise RuntimeError(fail)

        module.nvmlInit = init
        module.nvmlShutdown = lambda: None
        module.nvmlDeviceGetCount = lambda: 2
        module.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
        return module

    def context(**changes: object) -> Context:
        return replace(Context.from_environment(env={"SLURM_CONF": "/nonexistent"}), **changes)

    monkeypatch.setitem(sys.modules, "pynvml", fake(None))
    ok = doctor.check_nvml(context(wsl=False))
    assert (ok.status, ok.message) == ("ok", "NVML reads 2 GPU(s), driver 550.54.15")
    monkeypatch.setitem(sys.modules, "pynvml", fake("NVML Shared Library Not Found"))
    missing = doctor.check_nvml(context(wsl=False))
    assert missing.status == "fail" and missing.fix == "apt-get install nvidia-driver && reboot"
    wsl = doctor.check_nvml(context(wsl=True))
    assert wsl.fix == "echo /usr/lib/wsl/lib > /etc/ld.so.conf.d/ld.wsl.conf && ldconfig"
    monkeypatch.setitem(sys.modules, "pynvml", fake("Driver Not Loaded"))
    assert doctor.check_nvml(context(wsl=False)).fix == "modprobe nvidia"
