"""Does the NVIDIA driver leave the broker's device permissions alone? Pure parsing and a verdict.

The driver (and the setuid ``nvidia-modprobe`` that CUDA runs) re-creates and chmods
``/dev/nvidia*`` to its ``NVreg_DeviceFileUID/GID/Mode`` (default root:root 0666)
unless ``NVreg_ModifyDeviceFiles=0``: with the defaults, any user's CUDA start-up
would open every GPU again. The live values are in ``/proc/driver/nvidia/params``;
``/etc/modprobe.d`` holds what the next module load takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PARAMS = Path("/proc/driver/nvidia/params")
MODPROBE_DIR = Path("/etc/modprobe.d")
# Closed as the broker closes them: root:root 0660, so the driver's own resets keep them shut.
FIX_OPTIONS = "NVreg_DeviceFileUID=0 NVreg_DeviceFileGID=0 NVreg_DeviceFileMode=0660"
FIX_FILE = MODPROBE_DIR / "gpulane-nvidia.conf"
FIX_LINE = (
    f"echo 'options nvidia {FIX_OPTIONS}' > {FIX_FILE} && update-initramfs -u  "
    "# then reboot (or reload the nvidia module)"
)


@dataclass(frozen=True)
class DeviceFileParams:
    modify: int = 1  # NVreg_ModifyDeviceFiles: 1 (the default) lets the driver reset files
    uid: int = 0
    gid: int = 0
    mode: int = 0o666


def _number(text: str) -> int:
    """A module parameter's value as the kernel reads it (base 0: ``0660`` is octal)."""
    text = text.strip().strip('"')
    if re.fullmatch(r"0[0-7]+", text):
        return int(text, 8)
    return int(text, 0)


def parse_params(text: str) -> DeviceFileParams:
    """``/proc/driver/nvidia/params`` (``DeviceFileMode: 438``, decimal) -> the four values."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("ModifyDeviceFiles", "DeviceFileUID", "DeviceFileGID"):
            values[key.strip()] = int(value.strip())
        elif sep and key.strip() == "DeviceFileMode":
            values["DeviceFileMode"] = int(value.strip())
    return _params(values)


def parse_modprobe(texts: list[str]) -> DeviceFileParams | None:
    """``options nvidia NVreg_...=...`` lines of modprobe.d files (later ones win); None: none."""
    values: dict[str, int] = {}
    for text in texts:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 3 or words[0] != "options" or words[1] != "nvidia":
                continue
            for word in words[2:]:
                name, _, value = word.partition("=")
                key = name.removeprefix("NVreg_")
                if key in ("ModifyDeviceFiles", "DeviceFileUID", "DeviceFileGID", "DeviceFileMode"):
                    try:
                        values[key] = _number(value)
                    except ValueError:
                        continue
    return _params(values) if values else None


def _params(values: dict[str, int]) -> DeviceFileParams:
    default = DeviceFileParams()
    return DeviceFileParams(
        modify=values.get("ModifyDeviceFiles", default.modify),
        uid=values.get("DeviceFileUID", default.uid),
        gid=values.get("DeviceFileGID", default.gid),
        mode=values.get("DeviceFileMode", default.mode),
    )


def resets_open(params: DeviceFileParams) -> str:
    """Why the driver would open closed device files again ("" where it would not)."""
    if params.modify == 0:
        return ""
    if params.mode & 0o007:
        return (
            f"the NVIDIA driver resets device files to mode {params.mode:o} "
            "(NVreg_ModifyDeviceFiles=1), open to every user"
        )
    if params.gid != 0 and params.mode & 0o070:
        return (
            f"the NVIDIA driver resets device files to group {params.gid} mode {params.mode:o}: "
            "that group's members could open every GPU"
        )
    return ""


def live_params(path: Path = PARAMS) -> DeviceFileParams | None:
    """The loaded driver's values; None where no NVIDIA driver is loaded."""
    try:
        return parse_params(path.read_text())
    except OSError:
        return None


def modprobe_params(folder: Path = MODPROBE_DIR) -> DeviceFileParams | None:
    """What the next load of the module takes from ``folder/*.conf``, or None if unset."""
    try:
        files = sorted(folder.glob("*.conf"))
        return parse_modprobe([f.read_text(errors="replace") for f in files])
    except OSError:
        return None
