"""Is KVM really usable? The decision on console texts (pure), the probe against a
stand-in for qemu, and the per-process cache (craft/boot/accel.py)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcraft_tasks.craft.boot import accel
from vmcraft_tasks.craft.boot.accel import (
    AccelProbe,
    choose_accel,
    kvm_device_problem,
    kvm_verdict,
    probe_kvm,
)

PANIC_VFS = (
    "[    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel@lists.debian.org)\r\n"
    "[    1.704293] VFS: Disk quotas dquot_6.6.0\r\n"
    '[    4.761000] VFS: Cannot open root device "(null)" or unknown-block(0,0): error -6\r\n'
    "[    4.763087] Kernel panic - not syncing: VFS: Unable to mount root fs on "
    "unknown-block(0,0)\r\n"
)


def test_a_kernel_that_looked_for_its_root_proves_kvm() -> None:
    probe = kvm_verdict(PANIC_VFS, "", 0)
    assert probe.usable
    assert "VFS: Cannot open root device" in probe.reason


def test_starting_init_proves_kvm() -> None:
    console = "\x1b[0m[    1.2] Run /init as init process\r\n"
    assert kvm_verdict(console, "", None) == AccelProbe(
        True, "KVM ran a stock kernel up to: [    1.2] Run /init as init process"
    )


def test_disk_quota_lines_are_not_progress() -> None:
    # "VFS:" appears early in every boot; only the root search counts.
    probe = kvm_verdict("[ 1.7] VFS: Disk quotas dquot_6.6.0\r\n", "", None)
    assert not probe.usable
    assert "stopped early" in probe.reason and "Disk quotas" in probe.reason


def test_silence_is_not_usable() -> None:
    probe = kvm_verdict("", "qemu: warning: host doesn't support requested feature", None)
    assert probe == AccelProbe(
        False, "a stock kernel under KVM printed nothing (KVM cannot run it)"
    )


def test_an_emulation_failure_is_not_usable() -> None:
    stderr = "KVM internal error. Suberror: 1\nemulation failure\nEAX=00000000 EBX=00000000\n"
    probe = kvm_verdict("", stderr, None)
    assert not probe.usable
    assert probe.reason.startswith("KVM could not run a stock kernel: KVM internal error")


def test_qemu_aborting_on_msrs_is_not_usable() -> None:
    stderr = (
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
        "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
        "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n"
    )
    probe = kvm_verdict("", stderr, 134)
    assert not probe.usable and "failed to set MSR" in probe.reason


def test_an_early_exit_is_not_usable() -> None:
    probe = kvm_verdict("[ 0.0] Linux version 6.1\r\n", "", 1)
    assert not probe.usable
    assert probe.reason.startswith("qemu -accel kvm exited with status 1 before the kernel")
    assert "console: [ 0.0] Linux version 6.1" in probe.reason


def test_progress_wins_over_stderr_noise() -> None:
    assert kvm_verdict(PANIC_VFS, "qemu: warning: host doesn't support pni", 0).usable


def test_device_problems(tmp_path: Path) -> None:
    missing = str(tmp_path / "kvm")
    assert kvm_device_problem(missing) == f"{missing} does not exist (no KVM on this host)"
    readonly = tmp_path / "ro"
    readonly.write_text("")
    readonly.chmod(0o400)
    if os.geteuid() != 0:  # root opens it anyway
        problem = kvm_device_problem(str(readonly))
        assert problem is not None and "read-write" in problem
    assert probe_kvm("/nonexistent-kernel", device=missing) == AccelProbe(
        False, f"{missing} does not exist (no KVM on this host)"
    )


# --------------------------------------------------------------------------- the probe
# A stand-in for qemu that writes to the serial chardev's file like qemu, so the probe's
# edge (spawn, watch, kill the whole group) runs in well under a second.

FAKE_QEMU = """\
#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
assert "-kernel" in args and "-accel" in args and args[args.index("-accel") + 1] == "kvm"
assert "-drive" not in args, "the probe boots no disk"
chardev = args[args.index("-chardev") + 1]
path = chardev.split("path=", 1)[1].rsplit(",append=on", 1)[0].replace(",,", ",")
child = subprocess.Popen(["sleep", "300"])
with open({pids!r}, "w") as fh:
    fh.write(f"{{os.getpid()}} {{child.pid}}")
console = open(path, "a")
{body}
"""


def _fake(tmp_path: Path, body: str) -> tuple[str, str, str]:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(
        FAKE_QEMU.format(python=sys.executable, pids=str(tmp_path / "pids"), body=body)
    )
    script.chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 1024)
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    return str(script), str(kernel), str(device)


def _assert_gone(tmp_path: Path) -> None:
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"left running: {pids}")


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def test_probe_sees_the_root_panic_and_kills_qemu(tmp_path: Path) -> None:
    body = f"console.write({PANIC_VFS!r}); console.flush(); time.sleep(300)"
    qemu, kernel, device = _fake(tmp_path, body)
    started = time.monotonic()
    probe = probe_kvm(kernel, timeout_s=20, device=device, qemu_binary=qemu)
    assert probe.usable, probe
    assert time.monotonic() - started < 10, "decided at the panic, not at the timeout"
    _assert_gone(tmp_path)


def test_probe_gives_up_on_a_silent_guest(tmp_path: Path) -> None:
    qemu, kernel, device = _fake(tmp_path, "time.sleep(300)")
    probe = probe_kvm(kernel, timeout_s=1.0, device=device, qemu_binary=qemu)
    assert probe == AccelProbe(
        False, "a stock kernel under KVM printed nothing (KVM cannot run it)"
    )
    _assert_gone(tmp_path)


def test_probe_reports_qemu_exiting(tmp_path: Path) -> None:
    body = "child.kill(); sys.stderr.write('KVM internal error. Suberror: 1\\n'); sys.exit(1)"
    qemu, kernel, device = _fake(tmp_path, body)
    probe = probe_kvm(kernel, timeout_s=20, device=device, qemu_binary=qemu)
    assert not probe.usable
    assert probe.reason == "KVM could not run a stock kernel: KVM internal error. Suberror: 1"


# --------------------------------------------------------------------------- the cache


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []

    def fake_probe(kernel: str, *, device: str = "/dev/kvm", **_: object) -> AccelProbe:
        calls.append(kernel)
        return AccelProbe(kernel.endswith("good"), f"probed {kernel}")

    accel.forget_probes()
    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    yield calls
    accel.forget_probes()


def test_choose_accel_probes_once_per_device_whatever_the_kernel(
    counted: list[str], tmp_path: Path
) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    assert choose_accel("/k/good", device=str(device)) == ("kvm", "probed /k/good")
    assert choose_accel("/k/good", device=str(device)) == ("kvm", "probed /k/good")
    # The host's KVM was judged: another kernel (a copy per check) is not probed again.
    assert choose_accel("/k/bad", device=str(device)) == ("kvm", "probed /k/good")
    assert counted == ["/k/good"]
    # Another /dev/kvm (here: none at all) is another key.
    assert choose_accel("/k/bad", device=str(tmp_path / "none")) == ("tcg", "probed /k/bad")
    assert counted == ["/k/good", "/k/bad"]


def test_one_probe_serves_every_process_of_the_host_until_it_reboots(tmp_path, monkeypatch):
    from vmcraft_tasks.craft.boot import accel

    calls: list[str] = []

    def fake_probe(kernel: str, **_: object) -> accel.AccelProbe:
        # Named fake: the real probe boots qemu (tests/boot covers it).
        calls.append(kernel)
        return accel.AccelProbe(usable=False, reason="no kernel output under KVM")

    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    monkeypatch.setattr(accel, "_boot_id", lambda: "boot-1")
    accel.forget_probes(str(tmp_path))
    first = accel.choose_accel("/k1", device="/dev/null", cache_dir=str(tmp_path))
    assert first == ("tcg", "no kernel output under KVM") and calls == ["/k1"]
    accel.forget_probes()  # another process: only the file is left
    again = accel.choose_accel("/k2", device="/dev/null", cache_dir=str(tmp_path))
    assert again[0] == "tcg" and "probed earlier on this host" in again[1]
    assert calls == ["/k1"]
    monkeypatch.setattr(accel, "_boot_id", lambda: "boot-2")  # the host rebooted
    accel.choose_accel("/k3", device="/dev/null", cache_dir=str(tmp_path))
    assert calls == ["/k1", "/k3"]
    accel.forget_probes(str(tmp_path))
