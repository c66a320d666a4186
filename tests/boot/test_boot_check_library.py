"""The library's boot check end to end (craft/boot/check.py), on the real bootable BIOS
sample under qemu, one boot at a time:

- a qcow2 copy with every serial console setting removed: its default kernel is
  booted directly with its own command line + console=ttyS0, and passes;

The sample through its own boot loader, and `vmcraft boot-check` on a migrated disk,
are the fleet's boot checks in test_boot_migrated.py.

The sample keeps VMware's /dev/sdX names in its fstab, so it boots only on the SATA
disks a compatibility-mode domain gives it (on virtio it waits 90 s for /dev/sda2 and
stops in emergency mode, see test_boot_sources.py): every check here gets the domain
XML the project's libvirt writer renders for a guest of unknown capabilities.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import leaks
from vmcraft_tasks.craft.boot.check import BootCheckResult, check_guest
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.boot_variants import sata_domain, without_serial_console
from vmcraft_tasks.samples.bootable import BootableImage
from vmcraft_tasks.samples.toolkit import sha256_file

pytestmark = [pytest.mark.boot, pytest.mark.timeout(1200)]

# Generous: TCG on a loaded 2-core host is slow; these bound a hang, not speed.
TIME_LIMIT_S = 480.0


def _sata_domain(image: BootableImage) -> str:
    """What the conversion writes for this guest without driver facts: SATA, no NIC."""
    os_info = OSInfo(root_partition=3, type="linux", distro="debian", major=12).to_dict()
    return sata_domain(image.notes.hostname, 1, os_info)


def _qemu_under(directory: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmdline and str(directory) in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def _show(label: str, result: BootCheckResult) -> None:
    print(f"{label}: {json.dumps(result.to_dict(), indent=1)}")


def _guest_trees(g: VMCraft) -> tuple[OSInfo, GuestFS, GuestFS]:
    (root,) = g.inspect_os()
    boot = next(r.resolved_partition for r in root.fstab if r.entry.mountpoint == "/boot")
    assert boot is not None
    return root, g.guest(root), g.guest(boot)


def test_without_a_serial_console_its_default_kernel_is_booted_directly(
    bootable_bios: BootableImage, tmp_path: Path
) -> None:
    before = leaks.snapshot()
    copy = tmp_path / "no-serial.qcow2"
    without_serial_console(bootable_bios.path, str(copy))
    digest = sha256_file(copy)
    result = check_guest(
        [(str(copy), "qcow2")],
        domain_xml=_sata_domain(bootable_bios),
        work_dir=str(tmp_path / "work"),
        time_limit_s=TIME_LIMIT_S,
        accel="tcg",
    )
    _show("direct-kernel", result)
    assert (result.result, result.mode) == ("pass", "direct-kernel"), result
    notes = " ".join(result.notes)
    assert "the boot loader was bypassed" in notes
    assert f"/boot/vmlinuz-{bootable_bios.notes.kernel_version}" in notes
    assert result.serial_log is not None
    console = Path(result.serial_log).read_text()
    # The entry's own command line, the serial console added last.
    expected = f"root=UUID={bootable_bios.notes.root_uuid} ro console=tty0 console=ttyS0,115200n8"
    assert f"Command line: {expected}" in console
    assert "GNU GRUB" not in console
    assert sha256_file(copy) == digest, "the boot check changed the disk"
    assert not (tmp_path / "work" / "kernel").exists(), "the kernel copies were left behind"
    assert _qemu_under(tmp_path) == []
    assert leaks.snapshot().new_since(before) == []
