"""A monolithicFlat VMDK descriptor whose extent file does not exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    extent = "missing-flat.vmdk"
    descriptor = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        f'RW 2048 FLAT "{extent}" 0\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        'ddb.virtualHWVersion = "4"\n'
        'ddb.geometry.cylinders = "2"\n'
        'ddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.adapterType = "ide"\n'
    )
    path = out / "missing-extent.vmdk"
    path.write_text(descriptor)
    error = tk.qemu_img_error(path, "vmdk")
    return path.name, "vmdk", {"missing_extent": extent, "qemu_img_error": error}


def missing_extent_vmdk() -> BuiltImage:
    return tk.cached("missing-extent-vmdk", _build, sources=(__file__,))
