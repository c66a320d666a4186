"""A real boot of the unconverted LVM sample (samples/bootable_lvm.py) under qemu TCG.

Both disks on SATA, as on VMware: the initramfs must find PV 0 on /dev/sda3 and PV 1
on the whole of /dev/sdb, activate VG deb12-vg once both are there, mount the root LV
by its /dev/mapper path, and systemd must then mount /srv (spanning both disks) and
enable swap_1 before the login prompt. It proves the source is sound, so a failure
after migration is the migration's. The disks are attached with snapshot=on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import leaks
from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft.boot import BootDisk, BootLimits, BootSpec, Reason, boot_check
from vmcraft_tasks.samples.bootable_lvm import LvmBootableImage
from vmcraft_tasks.samples.toolkit import sha256_file

# A cold fixture build (debootstrap) plus the boot exceeds the suite's 300 s.
pytestmark = [pytest.mark.boot, pytest.mark.timeout(1200)]

LIMITS = BootLimits(overall_s=420.0, silence_s=150.0, until="login")
MAX_BOOT_S = 400.0


def test_lvm_source_on_sata_reaches_a_login_prompt(
    bootable_lvm: LvmBootableImage, tmp_path: Path
) -> None:
    notes = bootable_lvm.notes
    assert notes.kernel_cmdline.startswith("root=/dev/mapper/deb12--vg-root ro ")
    assert len(bootable_lvm.paths) == 2
    sources = {path: sha256_file(path) for path in bootable_lvm.paths}
    spec = BootSpec(
        disks=tuple(BootDisk(path, bootable_lvm.fmt, "sata") for path in bootable_lvm.paths),
        serial_log=str(tmp_path / "serial.log"),
    )
    snapshot = leaks.snapshot()
    verdict = boot_check(spec, LIMITS)
    print(f"{notes.variant} on sata: {verdict.as_dict()}")
    assert (verdict.result, verdict.reason) == ("pass", Reason.LOGIN_PROMPT), verdict
    assert verdict.seconds < MAX_BOOT_S
    console = (tmp_path / "serial.log").read_text(errors="replace")
    assert "Timed out waiting for device" not in console and "[FAILED]" not in console
    assert "emergency" not in console.lower()
    # systemd names the units after the /dev/mapper paths fstab gives.
    assert "Mounted \x1b[0;1;39msrv.mount\x1b[0m - /srv." in console
    assert "swap on /dev/mapper/deb12--vg-swap_1." in console  # the kernel's own line
    assert f"{notes.hostname} login:" in console
    assert {path: sha256_file(path) for path in sources} == sources, "booting changed a source"
    assert not leaks.snapshot().new_since(snapshot)
