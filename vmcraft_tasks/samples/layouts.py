"""Disks laid out as installers really lay them out, with partitions blkid cannot name.

A scan must find every filesystem even when a partition before it holds no
filesystem signature: a BIOS boot partition (GRUB's core.img, no signature), a
Microsoft reserved partition (zeros), an empty partition, or random bytes. These
images put such a partition in front of (or between) real filesystems.

Built with the sample toolkit; the cache name carries this module's own source hash,
so editing it rebuilds these images only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples import windows
from vmcraft_tasks.samples.toolkit import (
    GPT_BASIC_DATA,
    GPT_BIOS_BOOT,
    GPT_MSR,
    BuiltImage,
    MiB,
    Part,
    filled,
)

LAYOUT_ID = 0x40

LINUX_OS_RELEASE = (
    'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
    'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n'
)


def _cached(name: str, build: tk.Builder) -> BuiltImage:
    return tk.cached(f"layout-{name}", build, sources=(__file__,))


def _linux_root(work: Path, name: str, hostname: str, fstab: str) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {
        "/usr/lib/os-release": LINUX_OS_RELEASE,
        "/etc/hostname": hostname + "\n",
        "/etc/fstab": fstab,
        "/usr/bin/ls": Path("/usr/bin/true").read_bytes(),
    }
    tk.write_tree(
        work / name, files, {"/etc/os-release": "../usr/lib/os-release", "/bin": "usr/bin"}
    )
    return files


def _layout_notes(layout: dict[int, dict[str, Any]], table: str, **extra: Any) -> dict[str, Any]:
    return {"table": table, "partitions": layout, "partition_count": len(layout), **extra}


# --------------------------------------------------------------------------- GPT + BIOS boot


def _build_gpt_bios_boot(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    """GRUB on GPT: 1 MiB BIOS boot first, then /boot, root and swap (Debian's layout)."""
    uuid = {n: tk.fs_uuid(LAYOUT_ID + 1, n) for n in (2, 3, 4)}
    fstab = "/dev/sda3 / ext4 errors=remount-ro 0 1\n/dev/sda2 /boot ext4 defaults 0 2\n"
    _linux_root(work, "root", "bios-boot", fstab)
    (work / "boot").mkdir()
    (work / "boot" / "grub").mkdir()
    # core.img is not a filesystem: blkid finds no signature in it.
    bios = filled(work / "p1.img", 1, tk.pseudo_random(64 * 1024, b"core.img"))
    tk.mkfs_ext4(work / "p2.img", 32, "boot", uuid[2], work / "boot")
    tk.mkfs_ext4(work / "p3.img", 48, "root", uuid[3], work / "root")
    tk.mkswap(work / "p4.img", 8, "swap", uuid[4])
    parts = [
        Part(1, GPT_BIOS_BOOT, bios, "bios"),
        Part(32, tk.GPT_LINUX_FS, work / "p2.img", "boot"),
        Part(48, tk.GPT_LINUX_FS, work / "p3.img", "root"),
        Part(8, tk.GPT_LINUX_SWAP, work / "p4.img", "swap"),
    ]
    disk = out / "gpt-bios-boot.raw"
    layout = tk.assemble(disk, 92, "gpt", tk.gpt_uuid(LAYOUT_ID + 1, 0), parts)
    types = {1: None, 2: "ext4", 3: "ext4", 4: "swap"}
    return disk.name, "raw", _layout_notes(layout, "gpt", fs_types=types, root_partition=3)


def gpt_bios_boot_raw() -> BuiltImage:
    return _cached("gpt-bios-boot", _build_gpt_bios_boot)


# --------------------------------------------------------------------------- GPT Windows


def _build_gpt_windows(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    """What Windows Setup makes on a UEFI machine: ESP, Microsoft reserved, C: (NTFS)."""
    esp_mib, msr_mib, ntfs_mib = 34, 16, windows.NTFS_FS_MIB
    esp_files: dict[str, str | bytes] = {"/EFI/Microsoft/Boot/bootmgfw.efi": "dummy bootmgr\n"}
    tk.mkfs_vfat(work / "p1.img", esp_mib, "SYSTEM", "5EED0041", files=esp_files, fat=32)
    msr = filled(work / "p2.img", msr_mib, b"")  # Windows leaves it zeroed
    cmd_exe = windows.cmd_exe()
    files: dict[str, str | bytes] = {
        "/Windows/System32/cmd.exe": cmd_exe,
        **windows.windows_hives(work),
    }
    # NTFS records its own start sector (hidden sectors): ESP and MSR come first.
    start_sector = (1 + esp_mib + msr_mib) * MiB // tk.SECTOR
    tk.mkfs_ntfs(
        work / "p3.img",
        ntfs_mib,
        "Windows",
        serial="5EED0041C0FFEE41",
        hidden_sectors=start_sector,
        files=files,
        dirs=["/Program Files", "/Users"],
        work=work,
    )
    parts = [
        Part(esp_mib, tk.GPT_ESP, work / "p1.img", "EFI system partition"),
        Part(msr_mib, GPT_MSR, msr, "Microsoft reserved partition"),
        Part(ntfs_mib, GPT_BASIC_DATA, work / "p3.img", "Basic data partition"),
    ]
    disk = out / "gpt-windows.raw"
    size = 1 + esp_mib + msr_mib + ntfs_mib + 1
    layout = tk.assemble(disk, size, "gpt", tk.gpt_uuid(LAYOUT_ID + 2, 0), parts)
    types = {1: "vfat", 2: None, 3: "ntfs"}
    notes = _layout_notes(
        layout, "gpt", fs_types=types, root_partition=3, windows=dict(windows.WINDOWS_FACTS)
    )
    return disk.name, "raw", notes


def gpt_windows_raw() -> BuiltImage:
    return _cached("gpt-windows", _build_gpt_windows)


# --------------------------------------------------------------------------- MBR, empty between


def _build_mbr_empty_between(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    """An MBR disk whose second partition was created and never formatted."""
    uuid = {n: tk.fs_uuid(LAYOUT_ID + 3, n) for n in (1, 3)}
    (work / "data").mkdir()
    (work / "data" / "data.txt").write_text("data partition\n")
    tk.mkfs_ext4(work / "p1.img", 24, "data", uuid[1], work / "data")
    empty = filled(work / "p2.img", 8, b"")
    _linux_root(work, "root", "mbr-empty", f"UUID={uuid[3]} / ext4 defaults 0 1\n")
    tk.mkfs_ext4(work / "p3.img", 48, "root", uuid[3], work / "root")
    parts = [
        Part(24, "83", work / "p1.img"),
        Part(8, "83", empty),
        Part(48, "83", work / "p3.img"),
    ]
    disk = out / "mbr-empty-between.raw"
    layout = tk.assemble(disk, 82, "dos", "0x5eed0043", parts)
    types = {1: "ext4", 2: None, 3: "ext4"}
    return disk.name, "raw", _layout_notes(layout, "dos", fs_types=types, root_partition=3)


def mbr_empty_between_raw() -> BuiltImage:
    return _cached("mbr-empty-between", _build_mbr_empty_between)


# --------------------------------------------------------------------------- random bytes


def _build_random_first(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    """A partition full of random bytes (an encrypted blob, a wiped disk) before root."""
    uuid = tk.fs_uuid(LAYOUT_ID + 4, 2)
    noise = filled(work / "p1.img", 4, tk.pseudo_random(4 * MiB, b"noise"))
    _linux_root(work, "root", "random-first", f"UUID={uuid} / ext4 defaults 0 1\n")
    tk.mkfs_ext4(work / "p2.img", 48, "root", uuid, work / "root")
    parts = [
        Part(4, tk.GPT_LINUX_FS, noise, "noise"),
        Part(48, tk.GPT_LINUX_FS, work / "p2.img", "root"),
    ]
    disk = out / "random-first.raw"
    layout = tk.assemble(disk, 54, "gpt", tk.gpt_uuid(LAYOUT_ID + 4, 0), parts)
    types = {1: None, 2: "ext4"}
    return disk.name, "raw", _layout_notes(layout, "gpt", fs_types=types, root_partition=2)


def random_first_raw() -> BuiltImage:
    return _cached("random-first", _build_random_first)
