"""Rocky Linux 9 with its root on a thin LV: VG `rl` holds thin pool `pool00`, thin LV
`root` and a linear `swap`. The root must be reported with a reason, not exposed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import lvm_guests
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    return lvm_guests.build_thin_root("thin-root", 0x1300, "rocky-thin03", out, work)


def thin_root() -> BuiltImage:
    return tk.cached("thin-root", _build, sources=(__file__, *lvm_guests.SOURCES))
