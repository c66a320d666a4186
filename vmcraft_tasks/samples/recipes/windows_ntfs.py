"""Windows Server 2019 on an MBR disk: one NTFS with real registry hives and a PE cmd.exe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples import windows
from vmcraft_tasks.samples.toolkit import BuiltImage

WINDOWS_ID = 8
WINDOWS_DISK_ID = "0x5eed0008"
NTFS_SERIAL = "5EED0008C0FFEE08"


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    files: dict[str, str | bytes] = {
        "/Windows/System32/cmd.exe": windows.cmd_exe(),
        **windows.windows_hives(work),
        "/Windows/System32/drivers/etc/hosts": "127.0.0.1 localhost\r\n",
        "/Users/Administrator/Desktop/readme.txt": "Administrator desktop note\r\n",
        "/Program Files/Common Files/marker.txt": "program files marker\r\n",
    }
    dirs = ["/Program Files", "/Program Files (x86)", "/Users/Administrator", "/Windows/Temp"]
    fs = work / "p1.ntfs"
    tk.mkfs_ntfs(
        fs,
        windows.NTFS_FS_MIB,
        "Windows",
        serial=NTFS_SERIAL,
        hidden_sectors=2048,
        files=files,
        dirs=dirs,
        work=work,
    )
    disk = out / "windows-ntfs.raw"
    size_mib = windows.NTFS_FS_MIB + 2
    layout = tk.assemble(
        disk,
        size_mib,
        "dos",
        WINDOWS_DISK_ID,
        [tk.Part(windows.NTFS_FS_MIB, "7", fs, bootable=True)],
    )
    layout[1].update(fstype="ntfs", label="Windows", uuid=NTFS_SERIAL)
    layout[1]["partuuid"] = f"{WINDOWS_DISK_ID[2:]}-01"
    notes: dict[str, Any] = {
        "table": "dos",
        "disk_id": WINDOWS_DISK_ID,
        "virtual_size": size_mib * tk.MiB,
        "partition_count": 1,
        "partitions": layout,
        "fs_types": {1: "ntfs"},
        "labels": {1: "Windows"},
        "fs_uuids": {1: NTFS_SERIAL},
        "partuuids": {1: layout[1]["partuuid"]},
        "files": {1: tk.text_files(files)},
        "binary_files": {1: sorted(p for p, c in files.items() if isinstance(c, bytes))},
        "dirs": {1: dirs},
        "windows": dict(windows.WINDOWS_FACTS),
    }
    return disk.name, "raw", notes


def windows_ntfs_raw() -> BuiltImage:
    return tk.cached("windows-ntfs-raw", _build, sources=(__file__,))
