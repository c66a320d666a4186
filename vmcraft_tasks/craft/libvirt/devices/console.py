"""<serial> + <console>: the text console on the first serial port."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el


def elements() -> list[ET.Element]:
    # A pty-backed ttyS0 makes `virsh console` work for guests that log to serial
    # (cloud images do); the <console> names that same port, as libvirt expects.
    return [
        el("serial", {"type": "pty"}, el("target", {"port": 0})),
        el("console", {"type": "pty"}, el("target", {"type": "serial", "port": 0})),
    ]
