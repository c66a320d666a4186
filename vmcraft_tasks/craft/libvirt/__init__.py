"""libvirt domain XML for converted VMs, in the manner of virt-manager's virtinst.

Three separate steps: describe the VM (`DomainSpec` with `DiskSpec`s and `NetSpec`s),
let the inspected guest decide firmware, devices and clock
(`defaults_from_guest(os_info, has_esp, guestcaps).apply(spec)`: the disk bus and NIC
model come from the guest's `GuestCaps`), then `render_domain(spec)`;
`validate_domain_xml` checks the result against libvirt's schema.
"""

from __future__ import annotations

from vmcraft_tasks.craft.libvirt.defaults import GuestDefaults, defaults_from_guest
from vmcraft_tasks.craft.libvirt.domain import domain_element, domain_uuid, render_domain
from vmcraft_tasks.craft.libvirt.errors import DomainSpecError, DomainXMLError
from vmcraft_tasks.craft.libvirt.metadata import GUESTCAPS_NS
from vmcraft_tasks.craft.libvirt.osinfo import LIBOSINFO_NS, OsinfoId, osinfo_for
from vmcraft_tasks.craft.libvirt.spec import (
    ClockOffset,
    DiskBus,
    DiskFormat,
    DiskSpec,
    DomainSpec,
    NetSpec,
    VideoModel,
    target_dev_for,
)
from vmcraft_tasks.craft.libvirt.validate import validate_domain_file, validate_domain_xml

__all__ = [
    "GUESTCAPS_NS",
    "LIBOSINFO_NS",
    "ClockOffset",
    "DiskBus",
    "DiskFormat",
    "DiskSpec",
    "DomainSpec",
    "DomainSpecError",
    "DomainXMLError",
    "GuestDefaults",
    "NetSpec",
    "OsinfoId",
    "VideoModel",
    "defaults_from_guest",
    "domain_element",
    "domain_uuid",
    "osinfo_for",
    "render_domain",
    "target_dev_for",
    "validate_domain_file",
    "validate_domain_xml",
]
