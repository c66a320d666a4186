"""<rng>: a virtio entropy source."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el


def element() -> ET.Element:
    # Freshly booted guests without entropy can stall in early boot (sshd key
    # generation, getrandom()); /dev/urandom on the host never blocks.
    return el("rng", {"model": "virtio"}, el("backend", {"model": "random"}, text="/dev/urandom"))
