"""``gpulane doctor``'s GPU checks: device files, NVML, and pip's CUDA libraries on the loader path."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import site
import sys
from collections.abc import Iterable
from pathlib import Path

from gpulane.admin.doctor.context import Context, Finding, run

CUDA_LIBS = ("libcudnn.so", "libnccl.so", "libcublas.so", "libcudart.so")
LD_CONF_FILE = "/etc/ld.so.conf.d/gpulane-pip-nvidia.conf"
WSL_LIB = "/usr/lib/wsl/lib"


# --------------------------------------------------------------------------- GPUs


def check_gpu_devices(ctx: Context) -> Finding:
    if ctx.wsl:
        if Path("/dev/dxg").exists():
            return Finding("gpu devices", "ok", "WSL2: GPUs are reached through /dev/dxg")
        return Finding(
            "gpu devices",
            "fail",
            "WSL2 without /dev/dxg: no GPU is passed through",
            "wsl --update  # in Windows, with the NVIDIA Windows driver installed",
        )
    files = sorted(p for p in glob.glob("/dev/nvidia[0-9]*") if re.fullmatch(r"/dev/nvidia\d+", p))
    if files:
        return Finding("gpu devices", "ok", f"{len(files)} GPU device file(s): {', '.join(files)}")
    return Finding(
        "gpu devices",
        "fail",
        "no /dev/nvidia[0-9]* device files (is the NVIDIA driver installed and loaded?)",
        "modprobe nvidia && nvidia-smi",
    )


def _nvml(ctx: Context) -> tuple[int | None, str]:
    """(GPU count, detail) from NVML; count None where NVML cannot be read."""
    cached = ctx.cache.get("nvml")
    if isinstance(cached, tuple):
        return cached
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # pynvml's own NVMLError types, or ImportError
        value: tuple[int | None, str] = (None, str(error) or type(error).__name__)
    else:
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            value = (count, f"driver {driver}")
        except Exception as error:
            value = (None, str(error) or type(error).__name__)
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
    ctx.cache["nvml"] = value
    return value


def nvml_count(ctx: Context) -> int | None:
    return _nvml(ctx)[0]


def check_nvml(ctx: Context) -> Finding:
    count, detail = _nvml(ctx)
    if count:
        return Finding("nvml", "ok", f"NVML reads {count} GPU(s), {detail}")
    if count == 0:
        return Finding("nvml", "fail", f"NVML works but reports no GPUs ({detail})", "nvidia-smi")
    if ctx.wsl:
        fix = (
            f"echo {WSL_LIB} > /etc/ld.so.conf.d/ld.wsl.conf && ldconfig"
            if "Library Not Found" in detail
            else "wsl --shutdown  # in Windows, then reopen WSL"
        )
    elif "Library Not Found" in detail:
        fix = "apt-get install nvidia-driver && reboot"
    elif "Driver Not Loaded" in detail:
        fix = "modprobe nvidia"
    else:
        fix = "nvidia-smi  # shows what the driver reports"
    return Finding("nvml", "fail", f"NVML cannot be read: {detail}", fix)


# --------------------------------------------------------------------------- CUDA libraries


def default_python_prefixes() -> list[Path]:
    places = [*site.getsitepackages(), site.getusersitepackages(), sys.prefix]
    return [Path(p) for p in dict.fromkeys(places) if os.path.isdir(p)]


def pip_nvidia_lib_dirs(prefixes: Iterable[Path]) -> list[Path]:
    """``nvidia/*/lib`` folders of pip's nvidia-* wheels under each prefix or site-packages."""
    patterns = (
        "nvidia/*/lib",
        "lib/python3*/site-packages/nvidia/*/lib",
        "lib64/python3*/site-packages/nvidia/*/lib",
        "lib/python3*/dist-packages/nvidia/*/lib",
    )
    found: dict[Path, None] = {}
    for prefix in prefixes:
        for pattern in patterns:
            for match in sorted(glob.glob(str(prefix / pattern))):
                found[Path(match).resolve()] = None
    return list(found)


def loader_names(ctx: Context) -> tuple[set[str], list[Path]]:
    """Library names the dynamic loader resolves: ldconfig's cache and LD_LIBRARY_PATH."""
    result = run(["ldconfig", "-p"], ctx)
    if result.rc == 127:
        result = run(["/sbin/ldconfig", "-p"], ctx)
    names = {
        line.split()[0] for line in result.out.splitlines()[1:] if line.strip() and "=>" in line
    }
    dirs = [Path(d) for d in ctx.env.get("LD_LIBRARY_PATH", "").split(":") if d]
    return names, dirs


def check_cuda_libs(ctx: Context) -> Finding:
    prefixes = ctx.python_prefixes or default_python_prefixes()
    lib_dirs = pip_nvidia_lib_dirs(prefixes)
    libs = [
        (d, f.name) for d in lib_dirs for f in sorted(d.iterdir()) if f.name.startswith(CUDA_LIBS)
    ]
    where = ", ".join(str(p) for p in prefixes)
    if not libs:
        return Finding("cuda libs", "ok", f"no pip nvidia-* CUDA libraries under {where}")
    names, ld_dirs = loader_names(ctx)
    resolved_dirs = {d.resolve() for d in ld_dirs if d.exists()}
    unseen = [
        (d, name)
        for d, name in libs
        if name not in names
        and d not in resolved_dirs
        and not any((ld / name).exists() for ld in ld_dirs)
    ]
    if not unseen:
        return Finding(
            "cuda libs",
            "ok",
            f"{len(libs)} pip CUDA libraries, all on the loader path",
        )
    dirs = list(dict.fromkeys(d for d, _ in unseen))
    shown = ", ".join(dict.fromkeys(name for _, name in unseen))
    return Finding(
        "cuda libs",
        "warn",
        f"{shown} from pip's nvidia-* packages ({', '.join(map(str, dirs))}) are not on the "
        "loader path (ldconfig -p, LD_LIBRARY_PATH): programs that load them by name fail",
        f"printf '%s\\n' {' '.join(shlex.quote(str(d)) for d in dirs)} > {LD_CONF_FILE} && ldconfig",
    )
