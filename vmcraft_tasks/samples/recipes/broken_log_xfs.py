"""An XFS whose log head is garbage: ro fails, ro,norecovery works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import journals as jn
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

BROKEN_XFS_ID = 7


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = tk.fs_uuid(BROKEN_XFS_ID, 1)
    fs = work / "broken.xfs"
    jn.make_dirty_xfs(fs, "brokenlog", uuid, work)
    offset, length = jn.corrupt_xfs_log(fs)
    complaint = jn.verify_xfs_broken(fs, work)
    disk = out / "broken-log-xfs.raw"
    layout = tk.single_partition_gpt(disk, BROKEN_XFS_ID, fs, jn.XFS_FS_MIB, "brokenlog")
    notes = tk.single_partition_notes(BROKEN_XFS_ID, layout, "xfs", "brokenlog", uuid)
    notes |= {
        "log_state": jn.xfs_log_state(fs),
        "replay_works": False,
        "mount_fails_with": "ro",
        "mount_works_with": "ro,norecovery",
        "mount_error": complaint,
        "corrupted_fs_range": [offset, length],
        "files_before_replay": {jn.BEFORE_CRASH_PATH: jn.BEFORE_CRASH_TEXT},
        "files_lost": [jn.AFTER_CRASH_PATH],
    }
    return disk.name, "raw", notes


def broken_log_xfs_raw() -> BuiltImage:
    return tk.cached("broken-log-xfs-raw", _build, sources=(__file__,))
