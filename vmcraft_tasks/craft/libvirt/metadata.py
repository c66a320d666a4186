"""<metadata>: the guest's libosinfo identity and why its devices are what they are.

Both are namespaced elements, which libvirt keeps verbatim (one per namespace) and
tools like virt-manager read. The prefix and xmlns are written as plain names on
purpose: ElementTree's namespace support would hoist the declarations to <domain>
under a global, process-wide prefix registry. This way the output is exactly what
libvirt itself prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.guestcaps import GuestCaps
from vmcraft_tasks.craft.libvirt.elements import el
from vmcraft_tasks.craft.libvirt.osinfo import LIBOSINFO_NS, osinfo_for
from vmcraft_tasks.craft.libvirt.spec import DomainSpec

# The project's own namespace; the trailing version changes only if the element's
# meaning does, so tools reading old domains can tell.
GUESTCAPS_NS = "https://vmcraft-tasks/xmlns/guestcaps/1"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def libosinfo_element(os_info: Mapping[str, Any] | None) -> ET.Element | None:
    ident = osinfo_for(os_info)
    if ident is None:
        return None
    return el(
        "libosinfo:libosinfo",
        {"xmlns:libosinfo": LIBOSINFO_NS},
        el("libosinfo:os", {"id": ident.uri}),
    )


def guestcaps_element(caps: GuestCaps | None) -> ET.Element | None:
    """The device choices, each reason for compatibility mode, and the evidence.

    Someone looking at a Windows domain on SATA months later should not have to
    find the migration report to learn that viostor was missing.
    """
    if caps is None:
        return None
    return el(
        "vmcraft:guestcaps",
        {"xmlns:vmcraft": GUESTCAPS_NS},
        el("vmcraft:block", {"bus": caps.block_bus, "virtio": _yes_no(caps.virtio_blk)}),
        el("vmcraft:net", {"model": caps.net_model, "virtio": _yes_no(caps.virtio_net)}),
        [el("vmcraft:reason", text=reason) for reason in caps.reasons],
        [el("vmcraft:evidence", text=line) for line in caps.evidence],
    )


def metadata_element(spec: DomainSpec) -> ET.Element | None:
    """<metadata> with whatever is known; None (no element) when nothing is."""
    parts = [libosinfo_element(spec.os_info), guestcaps_element(spec.guestcaps)]
    if all(part is None for part in parts):
        return None
    return el("metadata", None, *parts)
