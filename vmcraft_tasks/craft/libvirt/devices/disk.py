"""<disk>: a converted image file as a block device of the guest."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el
from vmcraft_tasks.craft.libvirt.spec import DiskSpec


def element(disk: DiskSpec) -> ET.Element:
    return el(
        "disk",
        {"type": "file", "device": "disk"},
        # type= must match the image: libvirt never probes formats (a raw image
        # with a qcow2 header inside could otherwise read host files as backing).
        # discard=unmap lets the guest's TRIM shrink the sparse file on the host.
        el("driver", {"name": "qemu", "type": disk.format, "discard": "unmap"}),
        el("source", {"file": disk.path}),
        el("target", {"dev": disk.target_dev, "bus": disk.bus}),
    )
