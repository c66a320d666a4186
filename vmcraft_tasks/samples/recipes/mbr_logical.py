"""Rocky Linux 9 on MBR: a primary root, then an extended container with logical
ext4, ext4 and vfat partitions (numbered 5, 6, 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

MBR_ID = 3
MBR_DISK_ID = "0x5eedc0de"

ROCKY_OS_RELEASE = """\
NAME="Rocky Linux"
VERSION="9.3 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.3"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"
ANSI_COLOR="0;32"
CPE_NAME="cpe:/o:rocky:rocky:9::baseos"
HOME_URL="https://rockylinux.org/"
"""


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    fstab = (
        "# /etc/fstab\n"
        "/dev/sda1 / ext4 defaults 1 1\n"
        "/dev/sda5 /data ext4 defaults 1 2\n"
        "proc /proc proc defaults 0 0\n"
    )
    root_files: dict[str, str | bytes] = {
        "/etc/os-release": ROCKY_OS_RELEASE,
        "/etc/rocky-release": "Rocky Linux release 9.3 (Blue Onyx)\n",
        "/etc/hostname": "db02\n",
        "/etc/fstab": fstab,
    }
    root_symlinks = {"/etc/redhat-release": "rocky-release", "/etc/system-release": "rocky-release"}
    l5_files: dict[str, str | bytes] = {"/id.txt": "logical5\n"}
    l6_files: dict[str, str | bytes] = {"/id.txt": "logical6\n"}
    fat_files: dict[str, str | bytes] = {"/README.TXT": "data partition on a logical vfat\n"}

    root_src, l5_src, l6_src = work / "root", work / "l5", work / "l6"
    tk.write_tree(root_src, root_files, root_symlinks)
    for d in ("var/lib/rpm", "data", "proc", "usr/bin"):
        (root_src / d).mkdir(parents=True, exist_ok=True)
    tk.write_tree(l5_src, l5_files, {})
    tk.write_tree(l6_src, l6_files, {})

    fs_uuid = {1: tk.fs_uuid(MBR_ID, 1), 5: tk.fs_uuid(MBR_ID, 5), 6: tk.fs_uuid(MBR_ID, 6)}
    fs_uuid[7] = "DA7A-0007"
    labels = {1: "mbr-root", 5: "logical5", 6: "logical6", 7: "DATA"}
    fs_types = {1: "ext4", 5: "ext4", 6: "ext4", 7: "vfat"}
    fs = {n: work / f"p{n}.img" for n in (1, 5, 6, 7)}
    tk.mkfs_ext4(fs[1], 48, labels[1], fs_uuid[1], root_src)
    tk.mkfs_ext4(fs[5], 16, labels[5], fs_uuid[5], l5_src)
    tk.mkfs_ext4(fs[6], 16, labels[6], fs_uuid[6], l6_src)
    tk.mkfs_vfat(fs[7], 16, labels[7], "DA7A0007", files=fat_files, fat=16)

    parts = [
        tk.Part(48, "83", fs[1], bootable=True),
        tk.Part(None, "5"),
        tk.Part(16, "83", fs[5]),
        tk.Part(16, "83", fs[6]),
        tk.Part(16, "e", fs[7]),
    ]
    disk = out / "mbr-logical.raw"
    size_mib = 104
    layout = tk.assemble(disk, size_mib, "dos", MBR_DISK_ID, parts)
    for n, info in layout.items():
        if n in fs_types:
            info.update(fstype=fs_types[n], label=labels[n], uuid=fs_uuid[n])
        info["partuuid"] = f"{MBR_DISK_ID[2:]}-{n:02d}"  # what blkid derives for MBR
    notes: dict[str, Any] = {
        "table": "dos",
        "disk_id": MBR_DISK_ID,
        "virtual_size": size_mib * tk.MiB,
        "partition_count": 5,  # sfdisk lists the extended container too
        "partition_numbers": [1, 2, 5, 6, 7],
        "extended_partition": 2,
        "logical_partitions": [5, 6, 7],
        "partitions": layout,
        "fs_types": fs_types,
        "labels": labels,
        "fs_uuids": fs_uuid,
        "partuuids": {n: info["partuuid"] for n, info in layout.items()},
        "root_partition": 1,
        "files": {
            1: tk.text_files(root_files),
            5: tk.text_files(l5_files),
            6: tk.text_files(l6_files),
            7: tk.text_files(fat_files),
        },
        "symlinks": root_symlinks,
        "dirs": {1: ["/var/lib/rpm"]},
        "os_release": tk.parse_os_release(ROCKY_OS_RELEASE),
        "hostname": "db02",
        "fstab": fstab,
    }
    return disk.name, "raw", notes


def mbr_logical_raw() -> BuiltImage:
    return tk.cached("mbr-logical-raw", _build, sources=(__file__,))
