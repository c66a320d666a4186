"""<graphics>: a VNC display."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el


def element() -> ET.Element:
    # Windows has no serial console, and a Linux guest that fails early in boot
    # shows it only on screen. No listen address: libvirt's vnc_listen setting
    # (loopback by default) decides exposure, not a value baked into every domain.
    return el("graphics", {"type": "vnc", "port": -1, "autoport": "yes"})
