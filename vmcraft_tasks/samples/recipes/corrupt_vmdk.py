"""A VMDK sparse header (magic KDMV) with an absurd grain table size: qemu refuses it."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def _vmdk4_header() -> bytes:
    # A real VMDK sparse header layout (magic, version 1, valid-looking flags and
    # capacity) whose grain table size is absurd, so qemu refuses it while the
    # magic still says "VMDK".
    header = struct.pack(
        "<4sIIQQQQIQQQ?4sH",
        b"KDMV",  # magic
        1,  # version
        3,  # flags
        2048,  # capacity, sectors
        128,  # grain size, sectors
        1,  # descriptor offset
        20,  # descriptor size
        0xFFFFFFFF,  # grain table entries per table: far past qemu's limit
        0,  # redundant grain directory offset
        21,  # grain directory offset
        64,  # overhead
        False,  # unclean shutdown
        b"\n \r\n",  # line-ending check bytes
        0,  # compression
    )
    return header.ljust(tk.SECTOR, b"\0") + b"\xaa" * (64 * tk.SECTOR)


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    path = out / "x.vmdk"
    path.write_bytes(_vmdk4_header())
    error = tk.qemu_img_error(path, "vmdk")
    return path.name, "vmdk", {"magic": "KDMV", "qemu_img_error": error}


def corrupt_vmdk() -> BuiltImage:
    return tk.cached("corrupt-vmdk", _build, sources=(__file__,))
