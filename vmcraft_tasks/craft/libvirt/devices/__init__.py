"""One module per device kind; each returns the element(s) for its kind.

`devices_element` fixes the order, which is libvirt's own `virsh dumpxml` order,
so a rendered domain diffs cleanly against what libvirt later reports back.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.devices import (
    channel,
    console,
    disk,
    graphics,
    interface,
    memballoon,
    rng,
    video,
)
from vmcraft_tasks.craft.libvirt.elements import el
from vmcraft_tasks.craft.libvirt.spec import DomainSpec


def devices_element(spec: DomainSpec) -> ET.Element:
    # No <emulator>: libvirt picks the host's QEMU binary, and a path written here
    # would tie the XML to the conversion host's distribution.
    return el(
        "devices",
        None,
        [disk.element(d) for d in spec.disks],
        [interface.element(n) for n in spec.networks],
        console.elements(),
        channel.element(),
        graphics.element(),
        video.element(spec.video_model),
        memballoon.element(),
        rng.element(),
    )
