"""Defaults derived from the inspected guest, kept apart from rendering (virtinst's set_defaults).

The caller builds a `DomainSpec` with what it knows about the VM (name, size, the
converted disks, its networks); `defaults_from_guest` says how this particular
guest must be presented to KVM; `GuestDefaults.apply` writes that into the spec.
Rendering then never looks at the guest, so every choice is visible in one place.

Devices come from the guest's capabilities (`GuestCaps`: which drivers it was seen
to have), never from its OS name. Firmware, clock, Hyper-V enlightenments and video
do follow the OS type: they are about how the OS behaves, not which drivers it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vmcraft_tasks.craft.guestcaps import CAPS_UNKNOWN, GuestCaps
from vmcraft_tasks.craft.libvirt.errors import DomainSpecError
from vmcraft_tasks.craft.libvirt.spec import (
    ClockOffset,
    DiskBus,
    DiskSpec,
    DomainSpec,
    NetSpec,
    VideoModel,
    target_dev_for,
)

# uname -m names the inspector reports, mapped to libvirt's <type arch>.
_X86_ARCHES = {"x86_64": "x86_64", "i386": "i686", "i486": "i686", "i586": "i686", "i686": "i686"}


@dataclass(frozen=True)
class GuestDefaults:
    """The guest-dependent part of a domain spec ("partial spec")."""

    uefi: bool
    caps: GuestCaps = CAPS_UNKNOWN
    machine: str = "q35"
    arch: str = "x86_64"
    hyperv: bool = False
    clock_offset: ClockOffset = "utc"
    video_model: VideoModel = "virtio"

    @property
    def disk_bus(self) -> DiskBus:
        return self.caps.block_bus

    @property
    def net_model(self) -> str:
        return self.caps.net_model

    def _disk(self, disk: DiskSpec) -> DiskSpec:
        return replace(
            disk, bus=self.disk_bus, target_dev=target_dev_for(self.disk_bus, disk.target_dev)
        )

    def _net(self, net: NetSpec) -> NetSpec:
        return replace(net, model=self.net_model)

    def apply(self, spec: DomainSpec) -> DomainSpec:
        """`spec` with every guest-dependent choice replaced by these defaults.

        Replaced, not merged: applying other defaults to the result overrides these
        completely (disk targets are renamed back, vda <-> sda).
        """
        return replace(
            spec,
            uefi=self.uefi,
            machine=self.machine,
            arch=self.arch,
            hyperv=self.hyperv,
            clock_offset=self.clock_offset,
            video_model=self.video_model,
            disks=[self._disk(disk) for disk in spec.disks],
            networks=[self._net(net) for net in spec.networks],
            guestcaps=self.caps,
        )


def _arch(os_info: Mapping[str, Any]) -> str:
    arch = os_info.get("arch")
    if arch is None:
        # Unknown arch (unreadable binaries): the fleet only converts x86 images.
        return "x86_64"
    if arch not in _X86_ARCHES:
        # An aarch64 or ppc64le guest needs another machine type, firmware and
        # console; a q35 domain for it would be defined fine and never boot.
        raise DomainSpecError(f"guest architecture {arch!r} is not supported (x86 only)")
    return _X86_ARCHES[arch]


def defaults_from_guest(
    os_info: Mapping[str, Any] | None, has_esp: bool, caps: GuestCaps | None = None
) -> GuestDefaults:
    """How to present this guest to KVM: firmware, machine, devices, clock.

    `os_info` is an `OSInfo.to_dict()` (None when inspection found no OS);
    `has_esp` says whether the disk has an EFI system partition; `caps` are the
    guest's capabilities, which pick the disk bus and NIC model. Without caps the
    guest gets SATA and e1000e (`CAPS_UNKNOWN`), which boot without virtio drivers.
    """
    info: Mapping[str, Any] = os_info or {}
    # A guest installed for UEFI boots from its ESP and has no MBR boot code worth
    # trusting; one without an ESP was installed for BIOS. Copying the source's
    # firmware is what keeps the bootloader working unchanged.
    uefi = has_esp
    arch = _arch(info)
    caps = caps if caps is not None else CAPS_UNKNOWN
    if info.get("type") == "windows":
        return GuestDefaults(
            uefi=uefi,
            caps=caps,
            arch=arch,
            # Hyper-V enlightenments: Windows detects them and avoids spinlock and
            # APIC exits that otherwise make it noticeably slow under KVM.
            hyperv=True,
            # Windows keeps the RTC in local time; a UTC RTC shifts its clock.
            clock_offset="localtime",
            # No inbox virtio-gpu driver; plain VGA works from first boot.
            video_model="vga",
        )
    return GuestDefaults(uefi=uefi, caps=caps, arch=arch)
