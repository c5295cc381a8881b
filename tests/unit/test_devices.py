"""Pure parts of GPU device enforcement: driver parameters, who keeps access, whom to end."""

from __future__ import annotations

import pytest

from gpulane.broker import devices, nvidia_driver
from gpulane.broker.store import JobRecord
from gpulane.errors import OptionError
from gpulane.jobs import JobState


def test_live_params_are_decimal_and_the_default_resets_files_open():
    text = "ResmanDebugLevel: 4294967295\nModifyDeviceFiles: 1\nDeviceFileUID: 0\n"
    text += "DeviceFileGID: 0\nDeviceFileMode: 438\n"
    params = nvidia_driver.parse_params(text)
    assert params == nvidia_driver.DeviceFileParams(1, 0, 0, 0o666)
    assert "mode 666" in nvidia_driver.resets_open(params)


def test_modprobe_lines_octal_later_files_win_and_the_fix_holds():
    first = "options nvidia NVreg_DeviceFileMode=0666  # vendor\n"
    fix = f"options nvidia {nvidia_driver.FIX_OPTIONS}\n"
    params = nvidia_driver.parse_modprobe([first, "blacklist nouveau\n", fix])
    assert params == nvidia_driver.DeviceFileParams(1, 0, 0, 0o660)
    assert nvidia_driver.resets_open(params) == ""
    assert nvidia_driver.parse_modprobe(["options snd x=1\n"]) is None
    off = nvidia_driver.parse_modprobe(["options nvidia NVreg_ModifyDeviceFiles=0"])
    assert off is not None and nvidia_driver.resets_open(off) == ""
    group = nvidia_driver.DeviceFileParams(1, 0, 44, 0o660)
    assert "group 44" in nvidia_driver.resets_open(group)


def job(uid: int, gpus: list[int], state: JobState = JobState.RUNNING) -> JobRecord:
    return JobRecord(
        uid=uid, user=f"u{uid}", name="", gpus=len(gpus), slices=None, time_limit=60,
        mem=None, command=["true"], submitted_at=0.0, state=state, assigned_gpus=gpus,
    )  # fmt: skip


def test_each_slice_holder_has_an_entry_and_a_user_keeps_it_while_one_grant_is_left():
    target = devices.wanted([job(1001, [0]), job(1002, [0]), job(1001, [0, 1])])
    assert target == {0: frozenset({1001, 1002}), 1: frozenset({1001})}
    # alice's second job on GPU 0 ends: she keeps GPU 0 through the first.
    after = devices.wanted([job(1001, [0]), job(1002, [0]), job(1003, [1], JobState.QUEUED)])
    add, remove = devices.changes(target, after)
    assert add == [] and remove == [(1, 1001)]
    assert devices.changes({}, {0: frozenset({0, 5})}) == ([(0, 5)], [])  # root needs none


def test_who_is_ended_at_release_and_at_start():
    holders = [(10, "1", 1001, 0), (11, "1", 1002, 0), (12, "1", 120, 0), (13, "1", 1001, 1)]
    allowed = {0: frozenset({1002})}
    # A release of alice ends only alice's processes on a GPU she no longer holds.
    assert devices.to_end(holders, allowed, frozenset({1001}), 1000) == [
        (10, "1", 1001, 0),
        (13, "1", 1001, 1),
    ]
    # The sweep at start ends ordinary users' only (a daemon with uid 120 stays).
    assert [h[0] for h in devices.to_end(holders, allowed, None, 1000)] == [10, 13]


def test_device_files_option():
    text = "0=/dev/nvidia0,0=/dev/nvidia-caps/nvidia-cap12, 1=/dev/nvidia1"
    assert devices.parse_device_files(text, "--gpu-device-files") == {
        0: ("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap12"),
        1: ("/dev/nvidia1",),
    }
    for bad in ("/dev/nvidia0", "x=/dev/nvidia0", "0=dev/nvidia0"):
        with pytest.raises(OptionError, match="is not GPU=FILE"):
            devices.parse_device_files(bad, "--gpu-device-files")


def test_plan_auto_off_and_refusals():
    files = {0: ("/dev/null",)}
    off = devices.plan("auto", files, is_root=False, driver=None)
    assert not off.enforce and "not root" in off.why_off
    assert "no device files" in devices.plan("auto", {}, is_root=True, driver=None).why_off
    assert not devices.plan("off", files, is_root=True, driver=None).enforce
    with pytest.raises(devices.DeviceAccessError, match="needs a broker running as root"):
        devices.plan("on", files, is_root=False, driver=None)
    resets = nvidia_driver.DeviceFileParams()
    with pytest.raises(devices.DeviceAccessError, match="NVreg_DeviceFileMode=0660"):
        devices.plan("auto", {0: ("/dev/null",)}, is_root=True, driver=resets)


def test_mig_capability_files(tmp_path):
    proc, dev = tmp_path / "caps", tmp_path / "dev"
    access = proc / "gpu0" / "mig" / "gi1" / "access"
    access.parent.mkdir(parents=True)
    access.write_text("DeviceFileMinor: 12\nDeviceFileMode: 292\n")
    dev.mkdir()
    (dev / "nvidia-cap12").touch()
    assert devices.mig_cap_files(0, proc, dev) == [str(dev / "nvidia-cap12")]
    assert devices.mig_cap_files(1, proc, dev) == []


def test_doctor_prints_the_modprobe_line_where_the_driver_reopens_files(monkeypatch, tmp_path):
    from gpulane.admin.doctor.broker import BrokerSite, check_device_driver

    site = BrokerSite(socket=tmp_path / "s", state_dir=tmp_path)
    monkeypatch.setattr(nvidia_driver, "live_params", lambda: nvidia_driver.DeviceFileParams())
    monkeypatch.setattr(nvidia_driver, "modprobe_params", lambda: None)
    found = check_device_driver(site)
    assert found.status == "fail" and "NVreg_DeviceFileMode=0660" in found.fix
    fixed = nvidia_driver.DeviceFileParams(1, 0, 0, 0o660)
    monkeypatch.setattr(nvidia_driver, "modprobe_params", lambda: fixed)
    assert check_device_driver(site).status == "warn"  # staged, not loaded yet
    monkeypatch.setattr(nvidia_driver, "live_params", lambda: fixed)
    assert check_device_driver(site).status == "ok"
