"""A second Rocky Linux 9 guest whose VG is also named `rl` (other uuids, hostname and
content; one disk, `home` in one segment), to inspect alongside `rhel_lvm`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import lvm_guests
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

GUEST = lvm_guests.RockyLVM(
    name="rhel-lvm-twin",
    image_id=0x1200,
    hostname="rocky-twin02",
    two_disks=False,
    root_later_mib=36,
)


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    return lvm_guests.build_rocky_lvm(GUEST, out, work)


def rhel_lvm_twin() -> BuiltImage:
    return tk.cached("rhel-lvm-twin", _build, sources=(__file__, *lvm_guests.SOURCES))
