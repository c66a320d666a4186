"""Real boots of the unconverted bootable samples under qemu TCG, one at a time.

On virtio-blk, as after a migration to KVM without fixes, each source fails the way
real VMware guests do: (a) waits 90 s for /dev/sda2 and /dev/sda4 and drops to
emergency mode, (b) has no virtio_blk in its initramfs and stops there. On SATA the
guest sees /dev/sda through a driver its initramfs has, as on VMware, and comes up: the
images are sound, the failures are the migration problems. (The /dev/sdX guest on SATA
is booted by the fleet's boot check of its unfixed migration: test_boot_migrated.py.)

Every boot attaches the source with snapshot=on and keeps its serial log under
tmp_path, so the session's leak check sees any qemu left behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vmcraft_tasks.craft.boot import BootDisk, BootLimits, BootSpec, Reason, Verdict, boot_check
from vmcraft_tasks.craft.boot.qemu import Bus
from vmcraft_tasks.samples.bootable import BootableImage

# A cold fixture build (debootstrap) plus a 2-minute boot exceeds the suite's 300 s.
pytestmark = [pytest.mark.boot, pytest.mark.timeout(1200)]

# Generous: TCG on a loaded 2-core host is slow, and these bound a hang, not speed.
LIMITS = BootLimits(overall_s=420.0, silence_s=150.0)
MAX_BOOT_S = 400.0


def _fingerprint(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _qemu_pids_under(directory: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmdline and str(directory) in cmdline:
            found.append(int(pid))
    return found


def _boot(image: BootableImage, bus: Bus, tmp_path: Path) -> Verdict:
    spec = BootSpec(
        disks=(BootDisk(image.path, image.fmt, bus),),
        serial_log=str(tmp_path / "serial.log"),
    )
    before = _fingerprint(image.path)
    verdict = boot_check(spec, LIMITS)
    print(f"{image.notes.variant} on {bus}: {verdict.as_dict()}")
    assert _fingerprint(image.path) == before, "booting the source changed it"
    assert _qemu_pids_under(tmp_path) == [], "qemu outlived boot_check"
    return verdict


def test_fstab_sdx_on_virtio_reaches_emergency_mode(
    bootable_bios: BootableImage, tmp_path: Path
) -> None:
    verdict = _boot(bootable_bios, "virtio", tmp_path)
    assert (verdict.result, verdict.reason) == ("fail", Reason.EMERGENCY_MODE), verdict
    timed_out = [line for line in verdict.evidence if "Timed out waiting for device" in line]
    assert any(re.search(r"/dev/sda[24]\.$", line) for line in timed_out), verdict.evidence
    assert "[DEPEND] Dependency failed for boot.mount - /boot." in verdict.evidence
    assert re.search(r"emergency", verdict.evidence[-1], re.IGNORECASE), verdict.evidence
    # systemd's default device timeout is 90 s; nothing can decide before it.
    assert 85.0 < verdict.seconds < MAX_BOOT_S


def test_initramfs_without_virtio_blk_stops_in_the_initramfs(
    bootable_bios_modules_list: BootableImage, tmp_path: Path
) -> None:
    notes = bootable_bios_modules_list.notes
    assert not notes.initramfs_has_virtio_blk
    verdict = _boot(bootable_bios_modules_list, "virtio", tmp_path)
    assert (verdict.result, verdict.reason) == ("fail", Reason.INITRAMFS_SHELL), verdict
    alert = rf"^ALERT!\s+UUID={re.escape(notes.root_uuid)} does not exist"
    assert re.search(alert, verdict.evidence[-1]), verdict.evidence
    assert any(line.startswith("Gave up waiting for root") for line in verdict.evidence)
    # The initramfs waits its 30 s rootdelay first.
    assert 25.0 < verdict.seconds < MAX_BOOT_S


def test_modules_list_on_sata_boots_as_on_vmware(
    bootable_bios_modules_list: BootableImage, tmp_path: Path
) -> None:
    verdict = _boot(bootable_bios_modules_list, "sata", tmp_path)
    assert verdict.result == "pass", verdict
    assert verdict.reason in {Reason.DEFAULT_TARGET, Reason.LOGIN_PROMPT}
    assert verdict.seconds < MAX_BOOT_S
