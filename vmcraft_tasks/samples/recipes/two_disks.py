"""Rocky Linux 9 on two plain GPT disks (no LVM): / and /boot on disk 1; /var (xfs, by
UUID) and /srv (ext4, named `/dev/sdb2` in fstab) on disk 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import lvm_guests
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    return lvm_guests.build_two_disks("two-disks", 0x1400, "rocky-files04", out, work)


def two_disks() -> BuiltImage:
    return tk.cached("two-disks", _build, sources=(__file__, *lvm_guests.SOURCES))
