"""Realistic sample disk images built with sfdisk, mkfs.* and qemu-img, for demos and tests.

- `toolkit`: the cache and the building blocks (filesystems from staging trees,
  partition tables, sparse copies, the few mounts a build needs);
  `journals`: filesystems caught in a crash; `windows` and `hive`: what a Windows
  system volume holds.
- `recipes/`: one module per sample image; `layouts`: installer layouts whose
  partitions blkid cannot name; `bootable`: real bootable Debian guests.
- `SAMPLES`: every sample by name; `build(name)` returns the cached image, building it
  first if needed. `python -m vmcraft_tasks.samples` (or `vmcraft-samples`) lists,
  builds and copies them.

This package sits above the library (`vmcraft_tasks.craft`) and imports nothing else of
the project; tests, bench/ and the demo use it.
"""

from __future__ import annotations

from collections.abc import Callable

from vmcraft_tasks.samples import bootable, bootable_lvm, bootable_uefi, layouts
from vmcraft_tasks.samples.recipes import (
    broken_journal_ext4,
    broken_log_xfs,
    corrupt_vmdk,
    dirty_ext4,
    dirty_xfs,
    linux_gpt,
    mbr_logical,
    missing_extent_vmdk,
    not_an_image,
    rhel_lvm,
    rhel_lvm_twin,
    small_mbr,
    ten_lvs,
    ten_parts_ubuntu,
    text_vmdk,
    thin_root,
    twenty_parts,
    two_disks,
    windows_ntfs,
)
from vmcraft_tasks.samples.toolkit import BuiltImage

Recipe = Callable[[], BuiltImage]

SAMPLES: dict[str, Recipe] = {
    "linux_gpt_raw": linux_gpt.linux_gpt_raw,
    "linux_gpt_qcow2": linux_gpt.linux_gpt_qcow2,
    "linux_gpt_vmdk": linux_gpt.linux_gpt_vmdk,
    "linux_gpt_vhdx": linux_gpt.linux_gpt_vhdx,
    "linux_gpt_vpc": linux_gpt.linux_gpt_vpc,
    "mbr_logical_raw": mbr_logical.mbr_logical_raw,
    "dirty_ext4_raw": dirty_ext4.dirty_ext4_raw,
    "broken_journal_ext4_raw": broken_journal_ext4.broken_journal_ext4_raw,
    "dirty_xfs_raw": dirty_xfs.dirty_xfs_raw,
    "broken_log_xfs_raw": broken_log_xfs.broken_log_xfs_raw,
    "windows_ntfs_raw": windows_ntfs.windows_ntfs_raw,
    "twenty_parts_raw": twenty_parts.twenty_parts_raw,
    "corrupt_vmdk": corrupt_vmdk.corrupt_vmdk,
    "text_vmdk": text_vmdk.text_vmdk,
    "missing_extent_vmdk": missing_extent_vmdk.missing_extent_vmdk,
    "not_an_image": not_an_image.not_an_image,
    "gpt_bios_boot_raw": layouts.gpt_bios_boot_raw,
    "gpt_windows_raw": layouts.gpt_windows_raw,
    "mbr_empty_between_raw": layouts.mbr_empty_between_raw,
    "random_first_raw": layouts.random_first_raw,
    "ten_parts_ubuntu_raw": ten_parts_ubuntu.ten_parts_ubuntu_raw,
    "small_mbr_raw": small_mbr.small_mbr_raw,
    # Multi-disk guests: `path` is disk 1, notes["disk_files"] lists every disk
    # (vmcraft_tasks.samples.lvmkit.disk_paths).
    "rhel_lvm": rhel_lvm.rhel_lvm,
    "rhel_lvm_twin": rhel_lvm_twin.rhel_lvm_twin,
    "thin_root": thin_root.thin_root,
    "two_disks": two_disks.two_disks,
    "ten_lvs": ten_lvs.ten_lvs,
    # Minutes on first use (debootstrap from deb.debian.org), then cached.
    "bootable_debian_bios": lambda: bootable.bootable_debian_bios().as_built_image(),
    "bootable_debian_bios_modules_list": (
        lambda: bootable.bootable_debian_bios_modules_list().as_built_image()
    ),
    # Debian 12 on LVM over two disks, as its installer lays it out (multi-disk, as above).
    "bootable_debian_lvm": lambda: bootable_lvm.bootable_debian_lvm().as_built_image(),
    # Debian 12 installed for UEFI (ESP, GRUB at the fallback path): boot it with OVMF.
    "bootable_debian_uefi": lambda: bootable_uefi.bootable_debian_uefi().as_built_image(),
}
# The samples that take minutes to build: `warm` leaves them out unless named.
SLOW = frozenset(
    {
        "bootable_debian_bios",
        "bootable_debian_bios_modules_list",
        "bootable_debian_lvm",
        "bootable_debian_uefi",
    }
)


def build(name: str) -> BuiltImage:
    """The cached sample `name` (dashes or underscores), built first if needed."""
    key = name.replace("-", "_")
    if key not in SAMPLES:
        raise KeyError(f"no sample named {name!r}; known: {', '.join(SAMPLES)}")
    return SAMPLES[key]()


__all__ = ["SAMPLES", "SLOW", "BuiltImage", "Recipe", "build"]
