"""An ext4 whose journal holds a committed transaction: replay brings back a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import journals as jn
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

DIRTY_EXT4_ID = 4


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = tk.fs_uuid(DIRTY_EXT4_ID, 1)
    fs = work / "dirty.ext4"
    jn.make_dirty_ext4(fs, "dirty", uuid, work)
    jn.verify_replay(fs, work, "ext4", "ro,noload", "ro")
    disk = out / "dirty-ext4.raw"
    layout = tk.single_partition_gpt(disk, DIRTY_EXT4_ID, fs, jn.EXT4_FS_MIB, "dirty")
    notes = tk.single_partition_notes(DIRTY_EXT4_ID, layout, "ext4", "dirty", uuid)
    notes |= {
        "needs_recovery": True,
        "files_before_replay": {jn.BEFORE_CRASH_PATH: jn.BEFORE_CRASH_TEXT},
        "files_only_after_replay": {jn.AFTER_CRASH_PATH: jn.AFTER_CRASH_TEXT},
        "replay_works": True,
    }
    return disk.name, "raw", notes


def dirty_ext4_raw() -> BuiltImage:
    return tk.cached("dirty-ext4-raw", _build, sources=(__file__,))
