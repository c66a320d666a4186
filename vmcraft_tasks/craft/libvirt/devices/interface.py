"""<interface>: a NIC on a libvirt virtual network."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el
from vmcraft_tasks.craft.libvirt.spec import NetSpec


def element(net: NetSpec) -> ET.Element:
    return el(
        "interface",
        {"type": "network"},
        # Keeping the source VM's MAC keeps DHCP leases, udev/NetworkManager
        # names and licence bindings that hang off it; None lets libvirt pick one.
        el("mac", {"address": net.mac}) if net.mac else None,
        el("source", {"network": net.network}),
        el("model", {"type": net.model}),
    )
