"""Rocky Linux 9 on LVM over two disks: disk 1 GPT (BIOS boot, /boot ext4, a PV), disk 2
a whole-disk PV. VG `rl`: `root` (ext4) in two segments, `var` (xfs), `swap`, and
`home` spanning the end of disk 1's PV and disk 2. Raw images; `notes["disk_files"]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import lvm_guests
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

GUEST = lvm_guests.RockyLVM(
    name="rhel-lvm", image_id=0x1100, hostname="rocky-lvm01", two_disks=True
)


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    return lvm_guests.build_rocky_lvm(GUEST, out, work)


def rhel_lvm() -> BuiltImage:
    return tk.cached("rhel-lvm", _build, sources=(__file__, *lvm_guests.SOURCES))
