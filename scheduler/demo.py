"""The demo batch: real installed guests, a data disk, and a few VMs broken on purpose."""

from __future__ import annotations

import os

import yaml

from vmcraft_tasks.samples import bootable
from vmcraft_tasks.samples.recipes.corrupt_vmdk import corrupt_vmdk
from vmcraft_tasks.samples.recipes.dirty_ext4 import dirty_ext4_raw
from vmcraft_tasks.samples.recipes.windows_ntfs import windows_ntfs_raw


def demo_manifest(directory: str, *, boot_check: bool = True) -> dict[str, object]:
    """Two real Debian 12 guests (debootstrap + grub-install, GPT with a BIOS boot
    partition, /dev/sdX in fstab, exported as VMDK; one with a VMware-only initramfs),
    Windows on NTFS without virtio drivers, a data-only disk, a disk with no OS, a
    corrupt VMDK and a missing disk. Every migrated VM is boot-checked (`boot_check`)
    but the Windows sample: its NTFS volume holds a system tree, not a boot loader."""
    debian = bootable.bootable_debian_bios()
    legacy = bootable.bootable_debian_bios_modules_list()
    windows = windows_ntfs_raw()
    data = dirty_ext4_raw()
    corrupt = corrupt_vmdk()
    return {
        "batch": "demo",
        "defaults": {"options": {"memory_mib": 2048, "vcpus": 2, "boot_check": boot_check}},
        "vms": [
            {"id": "web01", "disks": [debian.path], "options": {"priority": 10}},
            {"id": "legacy02", "disks": [legacy.path], "options": {"priority": 5}},
            {"id": "win03", "disks": [windows.path], "options": {"boot_check": False}},
            {"id": "data04", "disks": [data.path], "options": {"os": "none"}},
            {"id": "blank05", "disks": [data.path]},
            {"id": "broken06", "disks": [corrupt.path]},
            {"id": "gone07", "disks": [os.path.join(directory, "missing", "gone07.vmdk")]},
        ],
    }


def write_demo_batch(directory: str, *, boot_check: bool = True) -> str:
    """Write the demo manifest into `directory` and return its path."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "demo.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(demo_manifest(directory, boot_check=boot_check), fh, sort_keys=False)
    return path
