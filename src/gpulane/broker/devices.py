"""GPU device access only during a grant: POSIX ACL entries on each GPU's device files.

Where it enforces (a root broker with device files), every GPU's files are closed at
start (root:root 0660, no ACL entries: what a broker killed mid-grant left is gone),
then each running job's user gets an ACL entry ``u:UID:rw`` on its GPUs' files; when
a user's last grant on a GPU ends, the entry goes and every process of that user still
holding one of those files open (found from /proc/*/fd) is killed, wherever it runs.

Why ACLs and not cgroup device rules: an ACL is checked at open(2) for any process of
the user (a kernel, a terminal, a ``setsid`` child) without knowing its cgroup, needs
no systemd delegation, and survives a broker restart on the file itself; cgroup v2
device control is a BPF program per cgroup, and a job's processes are not in one
cgroup the broker owns. ``setfacl`` (Debian's ``acl`` package) writes the entries,
argv lists only.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpulane.broker import nvidia_driver, procs
from gpulane.broker.store import JobRecord
from gpulane.errors import GpulaneError, OptionError
from gpulane.jobs import JobState

log = logging.getLogger("gpulane.broker.devices")

CLOSED_MODE = 0o660  # root:root, as nvidia_driver.FIX_OPTIONS has the driver make them
SETFACL_TIMEOUT = 10.0
OFF_FLAG = "--no-enforce-devices"
CAPS_PROC = Path("/proc/driver/nvidia/capabilities")
CAPS_DEV = Path("/dev/nvidia-caps")


class DeviceAccessError(GpulaneError):
    """Device enforcement was asked for where it would not hold; one line with the way out."""


@dataclass(frozen=True)
class DeviceSettings:
    """Which files are each GPU's, and whether the broker opens and closes them."""

    files: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # GPU index -> files
    enforce: bool = False
    why_off: str = "GPU device access is not enforced"


def parse_device_files(text: str, option: str) -> dict[int, tuple[str, ...]]:
    """``0=/dev/nvidia0,0=/dev/nvidia-caps/nvidia-cap12,1=/dev/nvidia1`` -> files per GPU."""
    files: dict[int, list[str]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        index, sep, path = item.partition("=")
        if not sep or not index.strip().isdigit() or not path.strip().startswith("/"):
            raise OptionError(
                f"{option} {item!r} is not GPU=FILE; use pairs such as "
                "0=/dev/nvidia0,1=/dev/nvidia1 (absolute paths)"
            )
        files.setdefault(int(index), []).append(path.strip())
    return {gpu: tuple(paths) for gpu, paths in files.items()}


def nvidia_device_files(count: int) -> dict[int, tuple[str, ...]]:
    """The machine's files for GPUs 0..count-1 (NVML indices): ``/dev/nvidiaM`` for the GPU's
    minor number M, and its MIG instances' capability files under /dev/nvidia-caps."""
    minors = _minor_numbers(count)
    files: dict[int, tuple[str, ...]] = {}
    for index, minor in enumerate(minors):
        paths = [f"/dev/nvidia{minor}"] if os.path.exists(f"/dev/nvidia{minor}") else []
        paths += mig_cap_files(minor)
        if paths:
            files[index] = tuple(paths)
    return files


def _minor_numbers(count: int) -> list[int]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [
            int(pynvml.nvmlDeviceGetMinorNumber(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(count)
        ]
    except Exception:  # pynvml's NVMLError kinds: fall back to index = minor number
        return list(range(count))


def mig_cap_files(minor: int, proc: Path = CAPS_PROC, dev: Path = CAPS_DEV) -> list[str]:
    """MIG GPU/compute instance capability files of GPU ``minor`` (each ``access`` file under
    /proc names its ``DeviceFileMinor``, the N of /dev/nvidia-caps/nvidia-capN)."""
    found = []
    for access in sorted(
        glob.glob(str(proc / f"gpu{minor}" / "mig" / "**" / "access"), recursive=True)
    ):
        try:
            text = Path(access).read_text()
        except OSError:
            continue
        match = re.search(r"DeviceFileMinor:\s*(\d+)", text)
        if match and (dev / f"nvidia-cap{match.group(1)}").exists():
            found.append(str(dev / f"nvidia-cap{match.group(1)}"))
    return found


def plan(
    mode: str,
    files: Mapping[int, tuple[str, ...]],
    *,
    is_root: bool,
    driver: nvidia_driver.DeviceFileParams | None,
) -> DeviceSettings:
    """Whether to enforce (``mode``: auto, on, off), or the one line why it cannot be done.

    auto enforces where it can hold (root, device files); it is an error, not a quiet
    "off", where it would look enforced and not be (the driver resets the files).
    """
    if mode == "off":
        return DeviceSettings(files, False, f"GPU device access is not enforced ({OFF_FLAG})")
    if not files:
        if mode == "on":
            raise DeviceAccessError(
                "--enforce-devices on: no GPU device files found; name them with "
                f"--gpu-device-files, or start with {OFF_FLAG}"
            )
        return DeviceSettings(files, False, "GPU device access is not enforced (no device files)")
    if not is_root:
        if mode == "on":
            raise DeviceAccessError(
                "--enforce-devices on needs a broker running as root (it sets the GPU device "
                f"files' ACLs); run it as root or start with {OFF_FLAG}"
            )
        return DeviceSettings(
            files, False, "GPU device access is not enforced (the broker is not root)"
        )
    why = _cannot_hold(files, driver)
    if why:
        raise DeviceAccessError(
            f"cannot enforce GPU device access: {why}; or start with {OFF_FLAG}"
        )
    return DeviceSettings(files, True, "")


def _cannot_hold(
    files: Mapping[int, tuple[str, ...]], driver: nvidia_driver.DeviceFileParams | None
) -> str:
    if shutil.which("setfacl") is None:
        return "setfacl is not installed (apt-get install acl)"
    for path in (p for paths in files.values() for p in paths):
        try:
            info = os.stat(path)
        except OSError as error:
            return f"{path}: {error.strerror}"
        if not stat.S_ISCHR(info.st_mode):
            return f"{path} is not a character device"
    if driver is not None:
        reset = nvidia_driver.resets_open(driver)
        if reset:
            return f"{reset}; fix: {nvidia_driver.FIX_LINE}"
    return ""


def wanted(jobs: Iterable[JobRecord]) -> dict[int, frozenset[int]]:
    """Who may open each GPU: the uids of the running jobs granted it (each slice holder)."""
    users: dict[int, set[int]] = {}
    for job in jobs:
        if job.state is JobState.RUNNING:
            for gpu in job.assigned_gpus:
                users.setdefault(gpu, set()).add(job.uid)
    return {gpu: frozenset(uids) for gpu, uids in users.items()}


def changes(
    current: Mapping[int, frozenset[int]], target: Mapping[int, frozenset[int]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(entries to add, entries to remove) as (GPU, uid) pairs; root needs none."""
    gpus = sorted(set(current) | set(target))
    add = [
        (g, u)
        for g in gpus
        for u in sorted(target.get(g, frozenset()) - current.get(g, frozenset()))
        if u
    ]
    remove = [
        (g, u)
        for g in gpus
        for u in sorted(current.get(g, frozenset()) - target.get(g, frozenset()))
        if u
    ]
    return add, remove


def to_end(
    holders: Iterable[tuple[int, str, int, int]],
    allowed: Mapping[int, frozenset[int]],
    users: frozenset[int] | None,
    uid_min: int,
) -> list[tuple[int, str, int, int]]:
    """Holders (pid, start, uid, GPU) to kill: their user has no grant on that GPU, and is
    one of ``users`` (a release) or, for the sweep at start (``users`` None), an ordinary
    user (uid at least ``uid_min``: system daemons such as nvidia-persistenced are left)."""
    return [
        h
        for h in holders
        if h[2] not in allowed.get(h[3], frozenset())
        and (h[2] in users if users is not None else h[2] >= uid_min)
    ]


def login_uid_min(path: str = "/etc/login.defs") -> int:
    """The first ordinary user's uid (UID_MIN of login.defs, 1000 where unset)."""
    try:
        with open(path) as handle:
            for line in handle:
                words = line.split()
                if len(words) >= 2 and words[0] == "UID_MIN" and words[1].isdigit():
                    return int(words[1])
    except OSError:
        pass
    return 1000


class DeviceGuard:
    """Keeps each GPU's device-file ACL entries equal to its holders (see the module doc)."""

    def __init__(self, settings: DeviceSettings) -> None:
        self.settings = settings
        self.current: dict[int, frozenset[int]] = {}  # the entries set on the files now
        self.uid_min = login_uid_min()

    @property
    def enforcing(self) -> bool:
        return self.settings.enforce

    def close_all(self) -> None:
        """root:root 0660 and no ACL entries on every file; raises DeviceAccessError where a
        file cannot be closed or takes no ACL entry (its filesystem has no ACLs)."""
        if not self.enforcing:
            return
        for paths in self.settings.files.values():
            for path in paths:
                try:
                    os.chown(path, 0, 0)
                    os.chmod(path, CLOSED_MODE)
                except OSError as error:
                    raise DeviceAccessError(
                        f"cannot close {path}: {error.strerror}; or start with {OFF_FLAG}"
                    ) from error
                for argv in (["-b", path], ["-m", "u:0:rw", path], ["-x", "u:0", path]):
                    why = _setfacl(argv)
                    if why:
                        raise DeviceAccessError(
                            f"cannot set ACLs on {path} ({why}): its filesystem needs POSIX "
                            f"ACLs; or start with {OFF_FLAG}"
                        )
        self.current = {}
        log.info(
            "GPU device files closed: %s",
            ", ".join(p for ps in self.settings.files.values() for p in ps),
        )

    def sync(self, jobs: Iterable[JobRecord]) -> None:
        """Open the GPUs to their holders' users and close them to anyone else."""
        if not self.enforcing:
            return
        target = wanted(jobs)
        add, remove = changes(self.current, target)
        for gpu, uid in add:
            if all(not _setfacl(["-m", f"u:{uid}:rw", p]) for p in self._files(gpu)):
                self._set(gpu, self.current.get(gpu, frozenset()) | {uid})
                log.info("GPU %d opened to uid %d", gpu, uid)
        removed: dict[int, set[int]] = {}
        for gpu, uid in remove:
            # Kept as set where a removal fails, so the next change tries again.
            if all(not _setfacl(["-x", f"u:{uid}", p]) for p in self._files(gpu)):
                self._set(gpu, self.current.get(gpu, frozenset()) - {uid})
                removed.setdefault(gpu, set()).add(uid)
                log.info("GPU %d closed to uid %d", gpu, uid)
        if removed:
            users = frozenset(u for uids in removed.values() for u in uids)
            self._end_holders(users, set(removed))

    def sweep(self) -> None:
        """At start: end ordinary users' processes that hold a GPU they have no grant on."""
        if self.enforcing:
            self._end_holders(None, set(self.settings.files))

    def _end_holders(self, users: frozenset[int] | None, gpus: set[int]) -> None:
        by_inode: dict[tuple[int, int], int] = {}
        for gpu in gpus:
            for path in self._files(gpu):
                try:
                    info = os.stat(path)
                except OSError:
                    continue
                by_inode[(info.st_dev, info.st_ino)] = gpu
        holders = [
            (pid, started, uid, by_inode[key])
            for pid, started, uid, key in procs.open_device_files(set(by_inode))
        ]
        for pid, started, uid, gpu in to_end(holders, self.current, users, self.uid_min):
            if procs.kill_process(pid, started):
                log.warning(
                    "killed process %d of uid %d: it held GPU %d without a grant", pid, uid, gpu
                )

    def _files(self, gpu: int) -> tuple[str, ...]:
        return self.settings.files.get(gpu, ())

    def _set(self, gpu: int, uids: frozenset[int]) -> None:
        if uids:
            self.current[gpu] = uids
        else:
            self.current.pop(gpu, None)


def _setfacl(args: list[str]) -> str:
    """Run ``setfacl ARGS``; "" on success, else its one-line complaint (also logged)."""
    try:
        done = subprocess.run(
            ["setfacl", *args], capture_output=True, text=True, timeout=SETFACL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("setfacl %s failed: %s", " ".join(args), error)
        return str(error)
    if done.returncode:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        log.error("setfacl %s failed: %s", " ".join(args), why)
        return why
    return ""
