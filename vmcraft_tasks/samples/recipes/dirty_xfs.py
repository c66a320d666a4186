"""An XFS whose log is dirty: log recovery brings back a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import journals as jn
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

DIRTY_XFS_ID = 6


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = tk.fs_uuid(DIRTY_XFS_ID, 1)
    fs = work / "dirty.xfs"
    jn.make_dirty_xfs(fs, "dirtyxfs", uuid, work)
    jn.verify_replay(fs, work, "xfs", "ro,norecovery,nouuid", "ro,nouuid")
    disk = out / "dirty-xfs.raw"
    layout = tk.single_partition_gpt(disk, DIRTY_XFS_ID, fs, jn.XFS_FS_MIB, "dirtyxfs")
    notes = tk.single_partition_notes(DIRTY_XFS_ID, layout, "xfs", "dirtyxfs", uuid)
    notes |= {
        "log_state": "DIRTY",
        "files_before_replay": {jn.BEFORE_CRASH_PATH: jn.BEFORE_CRASH_TEXT},
        "files_only_after_replay": {jn.AFTER_CRASH_PATH: jn.AFTER_CRASH_TEXT},
        "replay_works": True,
    }
    return disk.name, "raw", notes


def dirty_xfs_raw() -> BuiltImage:
    return tk.cached("dirty-xfs-raw", _build, sources=(__file__,))
