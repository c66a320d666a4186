"""<channel>: the QEMU guest agent's virtio-serial port."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el


def element() -> ET.Element:
    # Present even when the agent is not installed yet: it costs nothing, and the
    # agent (freeze for snapshots, clean shutdown) works the moment it is installed.
    # No source path: libvirt generates one under its own state directory.
    return el(
        "channel",
        {"type": "unix"},
        el("target", {"type": "virtio", "name": "org.qemu.guest_agent.0"}),
    )
