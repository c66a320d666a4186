"""The qemu command line for headless boot checks (pure), and the runner around it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from vmcraft_tasks.craft.boot import BootLimits, ConsoleWatcher, Reason, boot_check
from vmcraft_tasks.craft.boot.qemu import (
    BootDisk,
    BootSpec,
    DirectKernel,
    QemuSpecError,
    qemu_argv,
)


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_bios_virtio_boot() -> None:
    spec = BootSpec(disks=(BootDisk("/t/disk.vmdk", "vmdk"),), serial_log="/t/serial.log")
    assert qemu_argv(spec) == [
        "qemu-system-x86_64",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "file,id=serial0,path=/t/serial.log,append=on",
        "-serial",
        "chardev:serial0",
        "-drive",
        "if=none,id=disk0,file=/t/disk.vmdk,format=vmdk,snapshot=on",
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=0",
        "-nic",
        "none",
    ]


def test_every_drive_is_a_snapshot() -> None:
    spec = BootSpec(
        disks=(BootDisk("/a.qcow2"), BootDisk("/b.raw", "raw", "sata"), BootDisk("/c.qcow2")),
        firmware="uefi",
        ovmf_code="/fw/OVMF_CODE.fd",
        ovmf_vars="/fw/OVMF_VARS.fd",
    )
    drives = _values(qemu_argv(spec), "-drive")
    assert len(drives) == 5
    writable = [d for d in drives if "readonly=on" not in d]
    assert writable and all("snapshot=on" in d for d in writable)


def test_sata_disks_share_one_ahci_controller() -> None:
    spec = BootSpec(
        disks=(BootDisk("/boot.qcow2", bus="sata"), BootDisk("/data.qcow2", bus="sata")),
    )
    devices = _values(qemu_argv(spec), "-device")
    assert devices == [
        "ahci,id=ahci0",
        "ide-hd,drive=disk0,bus=ahci0.0,bootindex=0",
        "ide-hd,drive=disk1,bus=ahci0.1",
    ]


def test_mixed_buses_boot_from_the_first_disk() -> None:
    spec = BootSpec(disks=(BootDisk("/data.qcow2", bus="sata"), BootDisk("/os.qcow2")))
    devices = _values(qemu_argv(spec), "-device")
    assert devices == [
        "ahci,id=ahci0",
        "ide-hd,drive=disk0,bus=ahci0.0,bootindex=0",
        "virtio-blk-pci,drive=disk1",
    ]


def test_serial_to_stdout_without_a_log() -> None:
    argv = qemu_argv(BootSpec(disks=(BootDisk("/d.qcow2"),)))
    assert _values(argv, "-serial") == ["stdio"]
    assert "-chardev" not in argv


def test_commas_in_paths_are_escaped() -> None:
    spec = BootSpec(disks=(BootDisk("/t/a,b.qcow2"),), serial_log="/t/x,y.log")
    argv = qemu_argv(spec)
    assert _values(argv, "-drive") == [
        "if=none,id=disk0,file=/t/a,,b.qcow2,format=qcow2,snapshot=on"
    ]
    assert _values(argv, "-chardev") == ["file,id=serial0,path=/t/x,,y.log,append=on"]


def test_uefi_firmware_code_read_only_and_vars_snapshot() -> None:
    spec = BootSpec(
        disks=(BootDisk("/d.qcow2"),),
        firmware="uefi",
        ovmf_code="/usr/share/OVMF/OVMF_CODE_4M.fd",
        ovmf_vars="/usr/share/OVMF/OVMF_VARS_4M.fd",
    )
    drives = _values(qemu_argv(spec), "-drive")
    assert drives[:2] == [
        "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "if=pflash,unit=1,format=raw,snapshot=on,file=/usr/share/OVMF/OVMF_VARS_4M.fd",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (BootSpec(disks=()), "at least one disk"),
        (BootSpec(disks=(BootDisk("/d"),), firmware="uefi"), "ovmf_code and ovmf_vars"),
        (BootSpec(disks=(BootDisk("/d"),), ovmf_code="/c.fd"), "OVMF files given for a BIOS"),
        (BootSpec(disks=(BootDisk("/d"),), memory_mib=16), "too little"),
        (BootSpec(disks=(BootDisk("/d"),), cpus=0), "at least one"),
        (BootSpec(disks=tuple(BootDisk(f"/d{i}", bus="sata") for i in range(7))), "AHCI"),
    ],
)
def test_impossible_specs_are_refused(spec: BootSpec, message: str) -> None:
    with pytest.raises(QemuSpecError, match=message):
        qemu_argv(spec)


def test_nic_only_when_asked_and_then_restricted() -> None:
    spec = BootSpec(disks=(BootDisk("/d.qcow2"),), nic_model="virtio-net-pci")
    assert _values(qemu_argv(spec), "-nic") == ["user,model=virtio-net-pci,restrict=on"]


def test_kvm_memory_cpus_machine() -> None:
    spec = BootSpec(
        disks=(BootDisk("/d.qcow2"),), accel="kvm", memory_mib=2048, cpus=2, machine="pc"
    )
    argv = qemu_argv(spec)
    assert _values(argv, "-accel") == ["kvm"]
    assert _values(argv, "-m") == ["2048"]
    assert _values(argv, "-smp") == ["2"]
    assert _values(argv, "-machine") == ["pc"]


def test_direct_kernel_boot() -> None:
    spec = BootSpec(
        disks=(BootDisk("/d.qcow2"),),
        direct_kernel=DirectKernel("/k/vmlinuz", "/k/initrd.img", "root=/dev/vda3 console=ttyS0"),
    )
    argv = qemu_argv(spec)
    # qemu refuses a second bootindex 0 next to -kernel.
    assert _values(argv, "-device") == ["virtio-blk-pci,drive=disk0"]
    assert argv[-6:] == [
        "-kernel",
        "/k/vmlinuz",
        "-initrd",
        "/k/initrd.img",
        "-append",
        "root=/dev/vda3 console=ttyS0",
    ]


def test_direct_kernel_without_initrd_or_append() -> None:
    spec = BootSpec(disks=(BootDisk("/d.qcow2"),), direct_kernel=DirectKernel("/k/vmlinuz"))
    assert qemu_argv(spec)[-2:] == ["-kernel", "/k/vmlinuz"]


def test_other_qemu_binary() -> None:
    spec = BootSpec(disks=(BootDisk("/d.qcow2"),), qemu_binary="/opt/qemu/bin/qemu-system-x86_64")
    assert qemu_argv(spec)[0] == "/opt/qemu/bin/qemu-system-x86_64"


# --------------------------------------------------------------------------- the runner
# boot_check against a stand-in for qemu: a script that writes to the serial log file
# the way qemu does and starts a child, so every way out of boot_check can be shown
# to take the whole process group down, in well under a second each.

FAKE_QEMU = """\
#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
chardev = args[args.index("-chardev") + 1]
path = chardev.split("path=", 1)[1].rsplit(",append=on", 1)[0].replace(",,", ",")
child = subprocess.Popen(["sleep", "300"])
with open({pids!r}, "w") as fh:
    fh.write(f"{{os.getpid()}} {{child.pid}}")
console = open(path, "a")


def say(text):
    console.write(text)
    console.flush()  # qemu's serial file is unbuffered: a prompt arrives without a newline


{body}
"""


def _fake_qemu(tmp_path: Path, body: str) -> BootSpec:
    # Named like qemu, so the suite's leak check would also see one left running.
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(
        FAKE_QEMU.format(python=sys.executable, pids=str(tmp_path / "pids"), body=body)
    )
    script.chmod(0o755)
    return BootSpec(
        disks=(BootDisk(str(tmp_path / "disk.qcow2")),),
        serial_log=str(tmp_path / "serial.log"),
        qemu_binary=str(script),
    )


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"  # killed, waiting for init to reap it


def _assert_group_gone(tmp_path: Path) -> None:
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    deadline = time.monotonic() + 5.0
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), f"left running: {pids}"


FAST = BootLimits(overall_s=20.0, silence_s=10.0, poll_s=0.02)


def test_runner_stops_qemu_at_the_verdict(tmp_path: Path) -> None:
    body = (
        "say('Debian GNU/Linux 12 deb12-bios ttyS0\\r\\n\\r\\n')\n"
        "say('deb12-bios login: ')\n"
        "time.sleep(300)\n"
    )
    verdict = boot_check(_fake_qemu(tmp_path, body), FAST)
    assert (verdict.result, verdict.reason) == ("pass", Reason.LOGIN_PROMPT)
    assert verdict.evidence == ("deb12-bios login:",)
    assert verdict.seconds < 10.0
    _assert_group_gone(tmp_path)


def test_runner_gives_up_on_silence(tmp_path: Path) -> None:
    body = "say('Loading, please wait...\\r\\n')\ntime.sleep(300)\n"
    limits = BootLimits(overall_s=20.0, silence_s=0.5, poll_s=0.02)
    verdict = boot_check(_fake_qemu(tmp_path, body), limits)
    assert (verdict.result, verdict.reason) == ("fail", Reason.SILENCE)
    assert verdict.evidence == ("Loading, please wait...", "no console output for 0.5 s")
    _assert_group_gone(tmp_path)


def test_runner_ends_a_guest_that_never_stops_talking(tmp_path: Path) -> None:
    body = "while True:\n    say('A start job is running\\r\\n')\n    time.sleep(0.01)\n"
    limits = BootLimits(overall_s=1.0, silence_s=10.0, poll_s=0.02)
    verdict = boot_check(_fake_qemu(tmp_path, body), limits)
    assert (verdict.result, verdict.reason) == ("fail", Reason.TIMEOUT)
    assert verdict.evidence[-1] == "no verdict within 1 s"
    assert 1.0 <= verdict.seconds < 5.0
    _assert_group_gone(tmp_path)


def test_runner_reports_qemu_exiting_with_its_stderr(tmp_path: Path) -> None:
    body = (
        "say('SeaBIOS (version 1.16.2)\\r\\n')\n"
        "child.kill()\n"
        "sys.stderr.write(\"qemu-system-x86_64: -drive ...: Could not open 'x.qcow2'\\n\")\n"
        "sys.exit(1)\n"
    )
    verdict = boot_check(_fake_qemu(tmp_path, body), FAST)
    assert (verdict.result, verdict.reason) == ("fail", Reason.QEMU_EXITED)
    assert verdict.evidence == (
        "SeaBIOS (version 1.16.2)",
        "qemu exited with status 1: qemu-system-x86_64: -drive ...: Could not open 'x.qcow2'",
    )
    _assert_group_gone(tmp_path)


def test_runner_kills_qemu_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(self: ConsoleWatcher, data: bytes, seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ConsoleWatcher, "feed_bytes", interrupt)
    body = "say('SeaBIOS\\r\\n')\ntime.sleep(300)\n"
    with pytest.raises(KeyboardInterrupt):
        boot_check(_fake_qemu(tmp_path, body), FAST)
    _assert_group_gone(tmp_path)


def test_runner_needs_a_serial_log_file(tmp_path: Path) -> None:
    with pytest.raises(QemuSpecError, match="serial_log"):
        boot_check(BootSpec(disks=(BootDisk(str(tmp_path / "d.qcow2")),)))
