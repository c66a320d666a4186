"""Meeting notes saved with a .vmdk name: not a disk image at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    path = out / "notes.vmdk"
    path.write_text("These are meeting notes, not a disk image.\nSaved with a .vmdk name.\n")
    error = tk.qemu_img_error(path, "vmdk")
    return path.name, "vmdk", {"qemu_img_error": error}


def text_vmdk() -> BuiltImage:
    return tk.cached("text-vmdk", _build, sources=(__file__,))
