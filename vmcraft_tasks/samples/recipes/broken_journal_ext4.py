"""An ext4 that needs recovery but whose journal is broken: ro fails, ro,noload works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import journals as jn
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

BROKEN_EXT4_ID = 5


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = tk.fs_uuid(BROKEN_EXT4_ID, 1)
    fs = work / "broken.ext4"
    jn.make_dirty_ext4(fs, "brokenjournal", uuid, work)
    blocks = jn.corrupt_ext4_journal(fs)
    complaint = jn.verify_ext4_broken(fs, work)
    disk = out / "broken-journal-ext4.raw"
    layout = tk.single_partition_gpt(disk, BROKEN_EXT4_ID, fs, jn.EXT4_FS_MIB, "brokenjournal")
    notes = tk.single_partition_notes(BROKEN_EXT4_ID, layout, "ext4", "brokenjournal", uuid)
    notes |= {
        "needs_recovery": True,
        "replay_works": False,
        "mount_fails_with": "ro",
        "mount_works_with": "ro,noload",
        "mount_error": complaint,
        "corrupted_fs_blocks": blocks,
        "files_before_replay": {jn.BEFORE_CRASH_PATH: jn.BEFORE_CRASH_TEXT},
        "files_lost": [jn.AFTER_CRASH_PATH],
    }
    return disk.name, "raw", notes


def broken_journal_ext4_raw() -> BuiltImage:
    return tk.cached("broken-journal-ext4-raw", _build, sources=(__file__,))
