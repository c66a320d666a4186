"""check_guest's pure parts and flows (craft/boot/check.py), the runner's hooks
(should_stop, on_start, the firmware debug log: run.py, qemu.py) and the CLI's
boot-check output."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks.craft import cli
from vmcraft_tasks.craft.boot import accel, check
from vmcraft_tasks.craft.boot.check import (
    BootCheckResult,
    check_guest,
    clean_console,
    default_spec,
    default_time_limit,
    has_esp,
    newest_host_kernel,
    windows_verdict,
    with_disks,
)
from vmcraft_tasks.craft.boot.console import Reason, Verdict
from vmcraft_tasks.craft.boot.guest import GuestBoot
from vmcraft_tasks.craft.boot.qemu import (
    BootDisk,
    BootSpec,
    DirectKernel,
    QemuSpecError,
    qemu_argv,
)
from vmcraft_tasks.craft.boot.run import BootLimits, BootStopped, boot_check

# --------------------------------------------------------------------------- qemu.py


def test_debugcon_log_captures_the_firmware_debug_port() -> None:
    spec = BootSpec(
        disks=(BootDisk("/d.qcow2"),), serial_log="/w/serial.log", debugcon_log="/w/fw,1.log"
    )
    argv = qemu_argv(spec)
    i = argv.index("isa-debugcon,iobase=0x402,chardev=dbg")
    assert argv[i - 3 : i] == ["-chardev", "file,id=dbg,path=/w/fw,,1.log,append=on", "-device"]
    # The serial chardev stays the first one (runners and stand-ins look for it there).
    assert argv[argv.index("-chardev") + 1].startswith("file,id=serial0,")


def test_the_log_on_the_second_serial_port() -> None:
    spec = BootSpec(disks=(BootDisk("/d.qcow2"),), serial_log="/w/s.log", serial_port=1)
    argv = qemu_argv(spec)
    serials = [argv[i + 1] for i, a in enumerate(argv) if a == "-serial"]
    assert serials == ["null", "chardev:serial0"]
    with pytest.raises(QemuSpecError, match="port 0 or 1"):
        qemu_argv(BootSpec(disks=(BootDisk("/d.qcow2"),), serial_port=2))


def test_a_direct_kernel_needs_no_disk() -> None:
    spec = BootSpec(disks=(), serial_log="/w/s.log", direct_kernel=DirectKernel("/k", None, "x"))
    argv = qemu_argv(spec)
    assert "-drive" not in argv and argv[-2:] == ["-append", "x"]


# --------------------------------------------------------------------------- pure parts


def test_default_time_limits() -> None:
    assert (default_time_limit("tcg"), default_time_limit("kvm")) == (600.0, 180.0)


def test_esp_types() -> None:
    assert has_esp(["21686148-6449-6e6f-744e-656564454649", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"])
    assert has_esp(["83", "ef"])
    assert not has_esp(["0fc63daf-8483-4772-8e79-3d69d8477de4", "82"])


def test_clean_console() -> None:
    raw = b"\x1b[0;1mGRUB\x1b[0m\r\n\rLoading...\r[  OK  ] \x1b[32mStarted\x1b[0m x\n\xff"
    assert clean_console(raw) == "GRUB\n\nLoading...\n[  OK  ] Started x\n\ufffd"


def test_with_disks_keeps_the_xml_buses() -> None:
    spec = BootSpec(disks=(BootDisk("/xml/a.qcow2", "qcow2", "sata"), BootDisk("/xml/b.qcow2")))
    changed = with_disks(spec, [("/src/a.vmdk", "vmdk"), ("/src/b.vmdk", "vmdk")])
    assert changed.disks == (
        BootDisk("/src/a.vmdk", "vmdk", "sata"),
        BootDisk("/src/b.vmdk", "vmdk", "virtio"),
    )
    with pytest.raises(QemuSpecError, match="1 disk"):
        with_disks(spec, [("/src/a.vmdk", "vmdk")])


def test_default_spec() -> None:
    spec = default_spec([("/a.raw", "raw")], uefi=True, serial_log="/w/s.log")
    assert (spec.firmware, spec.machine, spec.nic_model) == ("uefi", "q35", None)
    assert spec.disks == (BootDisk("/a.raw", "raw", "virtio"),)


def _verdict(reason: Reason, *evidence: str, result: str = "fail") -> Verdict:
    return Verdict(result, reason, evidence, 12.0)  # type: ignore[arg-type]


def test_windows_verdicts() -> None:
    ran = windows_verdict(_verdict(Reason.TIMEOUT, "no verdict within 90 s"), 90.0)
    assert ran == ("pass", "stable-run", ["ran 90 s without rebooting or stopping"])
    reset = windows_verdict(_verdict(Reason.QEMU_EXITED, "qemu exited with status 0"), 90.0)
    assert reset[:2] == ("fail", "guest-reset")
    none = windows_verdict(_verdict(Reason.NO_BOOT_DEVICE, "No bootable device."), 90.0)
    assert none == ("fail", "no-boot-device", ["No bootable device."])


def test_newest_host_kernel() -> None:
    assert newest_host_kernel(["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-amd64"]) == (
        "/boot/vmlinuz-6.1.0-10-amd64"
    )
    assert newest_host_kernel([]) is None


def test_result_to_dict_is_json() -> None:
    result = BootCheckResult(
        "pass", "bootloader", "bios", "tcg", 61.234, ["login:"], "login-prompt", ["n"], "/w/c.log"
    )
    data = result.to_dict()
    assert data["seconds"] == 61.2
    assert json.loads(json.dumps(data)) == data


# --------------------------------------------------------------------------- run.py hooks

FAKE_QEMU = """\
#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
def chardev_path(ident):
    for i, arg in enumerate(args):
        if arg == "-chardev" and args[i + 1].startswith(f"file,id={{ident}},"):
            return args[i + 1].split("path=", 1)[1].rsplit(",append=on", 1)[0].replace(",,", ",")
child = subprocess.Popen(["sleep", "300"])
with open({pids!r}, "w") as fh:
    fh.write(f"{{os.getpid()}} {{child.pid}}")
console = open(chardev_path("serial0"), "a")
debug = open(chardev_path("dbg"), "a") if chardev_path("dbg") else None
{body}
"""
FAST = BootLimits(overall_s=20.0, silence_s=10.0, poll_s=0.02)


def _fake(tmp_path: Path, body: str, *, debugcon: bool = False) -> BootSpec:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(
        FAKE_QEMU.format(python=sys.executable, pids=str(tmp_path / "pids"), body=body)
    )
    script.chmod(0o755)
    return BootSpec(
        disks=(BootDisk(str(tmp_path / "disk.qcow2")),),
        serial_log=str(tmp_path / "serial.log"),
        debugcon_log=str(tmp_path / "firmware.log") if debugcon else None,
        qemu_binary=str(script),
    )


def _assert_gone(tmp_path: Path) -> None:
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"left running: {pids}")


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def test_should_stop_kills_qemu_at_once(tmp_path: Path) -> None:
    body = "console.write('Loading Linux ...\\r\\n'); console.flush(); time.sleep(300)"
    polls: list[float] = []

    def should_stop() -> str | None:
        polls.append(time.monotonic())
        return "the worker is shutting down" if len(polls) > 20 else None

    started: list[int] = []
    with pytest.raises(BootStopped) as caught:
        boot_check(_fake(tmp_path, body), FAST, should_stop=should_stop, on_start=started.append)
    assert caught.value.reason == "the worker is shutting down"
    assert caught.value.seconds < 10.0
    assert started == [int((tmp_path / "pids").read_text().split()[0])]
    _assert_gone(tmp_path)


def test_hooks_are_optional_and_on_start_failing_still_kills_qemu(tmp_path: Path) -> None:
    body = "time.sleep(300)"
    seen: list[int] = []

    def broken(pid: int) -> None:
        seen.append(pid)
        raise RuntimeError("recording the pid failed")

    with pytest.raises(RuntimeError):
        boot_check(_fake(tmp_path, body), FAST, on_start=broken)
    # Killed (and reaped) before it even got to start its child.
    assert len(seen) == 1 and _gone(seen[0])


def test_no_bootable_device_on_the_debug_port_ends_the_boot(tmp_path: Path) -> None:
    body = (
        "debug.write('SeaBIOS (version 1.16.2)\\nBooting from Hard Disk...\\n'"
        "'Boot failed: not a bootable disk\\n\\nNo bootable device.  Retrying in 60 seconds.\\n')\n"
        "debug.flush()\ntime.sleep(300)\n"
    )
    verdict = boot_check(_fake(tmp_path, body, debugcon=True), FAST)
    assert (verdict.result, verdict.reason) == ("fail", Reason.NO_BOOT_DEVICE)
    assert verdict.evidence[-1] == "No bootable device.  Retrying in 60 seconds."
    assert verdict.seconds < 10.0
    _assert_gone(tmp_path)


def test_firmware_chatter_decides_nothing(tmp_path: Path) -> None:
    body = (
        "debug.write('SeaBIOS\\nBooting from Hard Disk...\\n'); debug.flush()\n"
        "time.sleep(0.3)\n"
        "console.write('deb12 login: '); console.flush(); time.sleep(300)\n"
    )
    verdict = boot_check(_fake(tmp_path, body, debugcon=True), FAST)
    assert (verdict.result, verdict.reason) == ("pass", Reason.LOGIN_PROMPT)
    _assert_gone(tmp_path)


# --------------------------------------------------------------------------- check_guest flows
# The disks are never attached here: `_inspect` and the boot are replaced, so what is
# tested is how check_guest puts the pieces together.


def _found(**fields: Any) -> check._Found:
    return check._Found(**{"os_type": "linux", "has_esp": False, **fields})


def _patch(
    monkeypatch: pytest.MonkeyPatch,
    found: check._Found,
    boot: Callable[..., Verdict] | None = None,
) -> list[BootSpec]:
    booted: list[BootSpec] = []
    monkeypatch.setattr(check, "_inspect", lambda *a, **k: found)

    def fake_boot(spec: BootSpec, limits: BootLimits, **hooks: Any) -> Verdict:
        booted.append(spec)
        Path(spec.serial_log or "").write_bytes(b"\x1b[1mdeb12 login: \r\n")
        if boot is not None:
            return boot(spec, limits, **hooks)
        return Verdict("pass", Reason.LOGIN_PROMPT, ("deb12 login:",), 41.0)

    monkeypatch.setattr(check, "boot_check", fake_boot)
    return booted


def test_direct_kernel_flow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = GuestBoot(
        "direct-kernel",
        "/boot/vmlinuz-6.1",
        "/boot/initrd.img-6.1",
        "root=UUID=r ro console=ttyS0,115200n8",
        "no serial console configured in the guest: its default kernel booted directly",
    )
    kernel_dir = tmp_path / "work" / "kernel"
    found = _found(
        plan=plan, kernel=str(kernel_dir / "vmlinuz"), initrd=str(kernel_dir / "initrd.img")
    )
    booted = _patch(monkeypatch, found)
    kernel_dir.mkdir(parents=True)
    result = check_guest([("/src/a.vmdk", "vmdk")], work_dir=str(tmp_path / "work"), accel="tcg")
    assert (result.result, result.mode, result.firmware, result.accel) == (
        "pass",
        "direct-kernel",
        "bios",
        "tcg",
    )
    assert result.reason == "login-prompt" and result.evidence == ["deb12 login:"]
    assert any("the boot loader was bypassed" in note for note in result.notes)
    assert any("accel tcg as asked" in note for note in result.notes)
    spec = booted[0]
    assert spec.direct_kernel == DirectKernel(
        str(kernel_dir / "vmlinuz"), str(kernel_dir / "initrd.img"), plan.cmdline or ""
    )
    assert spec.debugcon_log == str(tmp_path / "work" / "firmware.log")
    assert result.serial_log is not None
    assert Path(result.serial_log).read_text() == "deb12 login: \n"
    assert not kernel_dir.exists(), "the kernel copies are removed after the boot"


def test_stopped_flow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = GuestBoot("bootloader", None, None, None, "serial console on ttyS0", 0)

    def stopped(spec: BootSpec, limits: BootLimits, **hooks: Any) -> Verdict:
        hooks["on_start"](4242)
        raise BootStopped("cancelled", 3.5)

    _patch(monkeypatch, _found(plan=plan), stopped)
    pids: list[int] = []
    result = check_guest(
        [("/a.qcow2", "qcow2")], work_dir=str(tmp_path), accel="tcg", on_qemu=pids.append
    )
    assert (result.result, result.reason, result.seconds, result.mode) == (
        "skipped",
        "cancelled",
        3.5,
        "bootloader",
    )
    assert pids == [4242]
    assert result.serial_log is not None


def test_stop_before_anything_is_attached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def never(*a: Any, **k: Any) -> check._Found:
        raise AssertionError("inspected after a stop")

    monkeypatch.setattr(check, "_inspect", never)
    result = check_guest(
        [("/a.qcow2", "qcow2")], work_dir=str(tmp_path), should_stop=lambda: "shutdown"
    )
    assert (result.result, result.reason) == ("skipped", "shutdown")


def test_no_os_is_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    booted = _patch(monkeypatch, _found(os_type="none", skip="no operating system found"))
    result = check_guest([("/a.qcow2", "qcow2")], work_dir=str(tmp_path), accel="tcg")
    assert (result.result, result.reason, booted) == ("skipped", "no operating system found", [])


def test_windows_stable_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def ran(spec: BootSpec, limits: BootLimits, **hooks: Any) -> Verdict:
        assert limits.overall_s == 90.0 and limits.silence_s > limits.overall_s
        return Verdict("fail", Reason.TIMEOUT, ("no verdict within 90 s",), 90.1)

    _patch(monkeypatch, _found(os_type="windows", has_esp=False), ran)
    (tmp_path / "firmware.log").write_text("SeaBIOS\nBooting from Hard Disk...\n")
    result = check_guest([("/w.qcow2", "qcow2")], work_dir=str(tmp_path), accel="tcg")
    assert (result.result, result.mode, result.reason) == (
        "pass",
        "windows-stable-run",
        "stable-run",
    )
    assert any("NOT verified" in note and "guest agent" in note for note in result.notes)


def test_uefi_default_from_the_esp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = GuestBoot("bootloader", None, None, None, "serial console on ttyS0", 0)
    booted = _patch(monkeypatch, _found(plan=plan, has_esp=True))
    result = check_guest(
        [("/a.qcow2", "qcow2")], work_dir=str(tmp_path), accel="kvm", ovmf=("/fw/C.fd", "/fw/V.fd")
    )
    assert (result.firmware, result.accel) == ("uefi", "kvm")
    assert (booted[0].ovmf_code, booted[0].ovmf_vars, booted[0].accel) == (
        "/fw/C.fd",
        "/fw/V.fd",
        "kvm",
    )


@pytest.mark.parametrize("host", [None, "/boot/vmlinuz-6.1.0-10-amd64"])
def test_auto_accel_probes_a_stock_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str | None
) -> None:
    plan = GuestBoot("bootloader", "/boot/vmlinuz-6.1", None, None, "serial console on ttyS0")
    found = _found(plan=plan, kernel=None if host else str(tmp_path / "kernel" / "vmlinuz"))
    limits: list[BootLimits] = []

    def record(spec: BootSpec, boot_limits: BootLimits, **hooks: Any) -> Verdict:
        limits.append(boot_limits)
        return Verdict("pass", Reason.DEFAULT_TARGET, ("Reached target multi-user",), 9.0)

    _patch(monkeypatch, found, record)
    inspected: list[bool] = []
    probed: list[str] = []

    def inspect(*args: Any, probe_kernel: bool, **kwargs: Any) -> check._Found:
        inspected.append(probe_kernel)
        return found

    def choose(kernel: str, **_: object) -> tuple[str, str]:
        probed.append(kernel)
        return "kvm", "ran to VFS"

    monkeypatch.setattr(check, "_inspect", inspect)
    monkeypatch.setattr(check, "host_kernel", lambda: host)
    monkeypatch.setattr(accel, "choose_accel", choose)
    result = check_guest([("/a.qcow2", "qcow2")], work_dir=str(tmp_path))
    assert result.accel == "kvm"
    # The guest's kernel is copied out for the probe only when the host has none.
    assert inspected == [host is None]
    assert probed == [host or found.kernel]
    expected = host or "the guest's own kernel"
    assert f"accel KVM: ran to VFS (probed with {expected})" in result.notes
    assert limits[0].overall_s == 180.0  # KVM's default time limit


# --------------------------------------------------------------------------- the CLI


def test_cli_exit_codes_and_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image = tmp_path / "a.qcow2"
    image.write_bytes(b"")
    calls: list[dict[str, Any]] = []

    def fake_check(disks: Any, **kwargs: Any) -> BootCheckResult:
        calls.append({"disks": disks, **kwargs})
        return BootCheckResult(
            "pass" if kwargs["accel"] == "tcg" else "fail",
            "bootloader",
            "bios",
            "tcg",
            60.0,
            ["deb12 login:"],
            "login-prompt",
            ["a note"],
            None,
        )

    monkeypatch.setattr(cli, "check_guest", fake_check)
    monkeypatch.setattr(
        cli, "_image_formats", lambda images, settings: [(i, "qcow2") for i in images]
    )
    assert (
        cli.main(
            [
                "boot-check",
                str(image),
                "--accel",
                "tcg",
                "--json",
                "--work-dir",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["result"] == "pass"
    assert calls[0]["disks"] == [(str(image), "qcow2")] and calls[0]["domain_xml"] is None
    assert (
        cli.main(["boot-check", str(image), "--accel", "kvm", "--work-dir", str(tmp_path / "w")])
        == 1
    )
    out = capsys.readouterr().out
    assert out.startswith("boot check: FAIL (login-prompt)") and "note: a note" in out
    # Could not check at all: 2, with the reason on stderr.
    assert cli.main(["boot-check", str(image), "--domain", str(tmp_path / "missing.xml")]) == 2
    assert "could not run" in capsys.readouterr().err
