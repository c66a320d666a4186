"""256 KiB of pseudo-random bytes: qemu-img probes it as raw."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    path = out / "junk.bin"
    data = tk.pseudo_random(256 * 1024, b"vmcraft junk")
    path.write_bytes(data)
    return path.name, "raw", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def not_an_image() -> BuiltImage:
    return tk.cached("not-an-image", _build, sources=(__file__,))
