"""The UEFI sample (samples/bootable_uefi.py), read by the library.

The inspection is fast (no boot): the library must find the Debian root, resolve every
fstab entry, the ESP's `UUID=XXXX-XXXX` (vfat, mounted through fusefat) included, and
the domain defaults must pick UEFI firmware because the disk has an ESP.

The boot is the fleet's boot check of the migrated guest (test_boot_migrated.py):
OVMF (Secure Boot off) finds GRUB at the ESP's fallback path with no NVRAM entry, GRUB
finds /boot by UUID, and the guest comes up to a login prompt with /boot/efi mounted.
"""

from __future__ import annotations

import pytest

from tests import leaks
from vmcraft_tasks.craft.boot import BootLimits
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.libvirt import defaults_from_guest, render_domain
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.outputs import domain_spec, has_esp
from vmcraft_tasks.samples.bootable_uefi import UefiBootableImage

# A cold fixture build (debootstrap) plus the boot exceeds the suite's 300 s.
pytestmark = pytest.mark.timeout(1200)

LIMITS = BootLimits(overall_s=480.0, silence_s=150.0, until="login")
MAX_BOOT_S = 450.0


@pytest.mark.integration
def test_the_library_finds_the_root_and_the_esp(bootable_uefi: UefiBootableImage) -> None:
    notes = bootable_uefi.notes
    esp = notes.partition("esp")
    assert (esp.number, esp.fs_type, notes.esp_uuid) == (1, "vfat", "B007-0401")
    assert notes.efi_loader in notes.esp_files
    assert f"search.fs_uuid {notes.boot_uuid} root" in notes.grub_load_cfg
    snapshot = leaks.snapshot()
    with VMCraft(bootable_uefi.path) as g:
        report = g.inspect()
        (root,) = report.roots
        esp_mount = report.mounts[esp.number]
        tree_notes = g.mount_guest_tree(root, report.mounts)
        guest = GuestFS(report.mounts[root.root_partition].mountpoint)
        loader_in_tree = guest.is_file(f"{notes.esp_mountpoint}{notes.efi_loader}")
    assert not leaks.snapshot().new_since(snapshot)

    assert (root.distro, root.major, root.hostname) == ("debian", 12, notes.hostname)
    assert root.root_partition == notes.partition("root").number
    by_mountpoint = {entry.entry.mountpoint: entry for entry in root.fstab}
    efi = by_mountpoint["/boot/efi"]
    assert (efi.entry.spec, efi.entry.fstype) == (f"UUID={notes.esp_uuid}", "vfat")
    assert (efi.resolved_partition, efi.how) == (esp.number, "uuid")
    assert "umask=0077" in efi.entry.options
    resolved = {entry.entry.mountpoint: entry.resolved_partition for entry in root.fstab}
    assert resolved == {"/": 3, "/boot": 2, "/boot/efi": 1, "none": 4}
    # The kernel here has no vfat: the ESP is read through fusefat.
    assert (esp_mount.ok, esp_mount.fstype, esp_mount.driver) == (True, "vfat", "fuse")
    assert tree_notes == [] and loader_in_tree

    # The domain: UEFI because the disk has an ESP (its partition type, not the OS).
    partitions = [p.to_dict() for p in report.partitions]
    assert has_esp(partitions)
    assert defaults_from_guest(root.to_dict(), has_esp(partitions)).uefi
    vm = {
        "id": "deb12-uefi",
        "memory_mib": 1024,
        "vcpus": 1,
        "disks": [{"target": "/out/deb12-uefi-disk0.qcow2"}],
        "target_format": "qcow2",
    }
    spec = domain_spec(vm, {"roots": [root.to_dict()], "partitions": partitions})
    assert spec.uefi
    assert 'firmware="efi"' in render_domain(spec)
