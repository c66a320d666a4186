"""A GPT disk of `count` equal ext4 partitions, each holding /id.txt with its number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def ext4_gpt(name: str, count: int, part_mib: int, image_id: int) -> BuiltImage:
    """Partitions "part01".. with ext4 labels "p01".., in `name`.raw; UUIDs from `image_id`."""

    def build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
        parts: list[tk.Part] = []
        labels, fs_uuids, files = {}, {}, {}
        for n in range(1, count + 1):
            labels[n] = f"p{n:02d}"
            fs_uuids[n] = tk.fs_uuid(image_id, n)
            files[n] = {"/id.txt": f"{n}\n"}
            fs = work / f"p{n:02d}.img"
            src = tk.write_tree(work / f"src{n:02d}", dict(files[n]))
            tk.mkfs_ext4(fs, part_mib, labels[n], fs_uuids[n], src)
            partuuid = tk.gpt_uuid(image_id, n)
            parts.append(tk.Part(part_mib, tk.GPT_LINUX_FS, fs, f"part{n:02d}", partuuid))
        disk = out / f"{name}.raw"
        size_mib = count * part_mib + 2  # GPT headers at both ends
        layout = tk.assemble(disk, size_mib, "gpt", tk.gpt_uuid(image_id, 0), parts)
        for n, info in layout.items():
            info.update(fstype="ext4", label=labels[n], uuid=fs_uuids[n])
        notes: dict[str, Any] = {
            "table": "gpt",
            "disk_guid": tk.gpt_uuid(image_id, 0),
            "virtual_size": size_mib * tk.MiB,
            "partition_count": count,
            "part_mib": part_mib,
            "partitions": layout,
            "fs_types": dict.fromkeys(range(1, count + 1), "ext4"),
            "labels": labels,
            "fs_uuids": fs_uuids,
            "partuuids": {n: info["partuuid"] for n, info in layout.items()},
            "partnames": {n: info["name"] for n, info in layout.items()},
            "files": files,
        }
        return disk.name, "raw", notes

    return tk.cached(f"{name}-{image_id:x}", build, sources=(__file__,))


def gpt_ext4_raw(count: int, part_mib: int = 16) -> BuiltImage:
    """`count` ext4 partitions of `part_mib` MiB (the parallel-mount benchmark's disks)."""
    return ext4_gpt(f"gpt-ext4-{count}x{part_mib}mib", count, part_mib, 0xB000 + count)
