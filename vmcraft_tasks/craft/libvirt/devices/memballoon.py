"""<memballoon>: the virtio balloon."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el


def element() -> ET.Element:
    # Written out rather than left to libvirt's implicit default, so the rendered
    # XML already equals what `virsh dumpxml` shows (and the balloon's memory stats
    # are what `virsh dommemstat` reads).
    return el("memballoon", {"model": "virtio"})
