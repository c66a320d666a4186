"""Defaults derived from the inspected guest, kept apart from rendering (virtinst's set_defaults).

The caller builds a `DomainSpec` with what it knows about the VM (name, size, the
converted disks, its networks); `defaults_from_guest` says how this particular
guest must be presented to KVM; `GuestDefaults.apply` writes that into the spec.
Rendering then never looks at the guest OS, so every choice is visible in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vmcraft_tasks.craft.libvirt.errors import DomainSpecError
from vmcraft_tasks.craft.libvirt.spec import ClockOffset, DiskBus, DomainSpec, VideoModel

# uname -m names the inspector reports, mapped to libvirt's <type arch>.
_X86_ARCHES = {"x86_64": "x86_64", "i386": "i686", "i486": "i686", "i586": "i686", "i686": "i686"}

WINDOWS_VIRTIO_NOTE = (
    "Windows on virtio disk and NIC: the virtio-win drivers (viostor, NetKVM) must be "
    "installed in the guest before first boot, or it stops with INACCESSIBLE_BOOT_DEVICE"
)


@dataclass(frozen=True)
class GuestDefaults:
    """The guest-dependent part of a domain spec ("partial spec")."""

    uefi: bool
    machine: str = "q35"
    arch: str = "x86_64"
    disk_bus: DiskBus = "virtio"
    net_model: str = "virtio"
    hyperv: bool = False
    clock_offset: ClockOffset = "utc"
    video_model: VideoModel = "virtio"
    notes: tuple[str, ...] = ()

    def apply(self, spec: DomainSpec) -> DomainSpec:
        """`spec` with every guest-dependent choice replaced by these defaults."""
        return replace(
            spec,
            uefi=self.uefi,
            machine=self.machine,
            arch=self.arch,
            hyperv=self.hyperv,
            clock_offset=self.clock_offset,
            video_model=self.video_model,
            disks=[replace(disk, bus=self.disk_bus) for disk in spec.disks],
            networks=[replace(net, model=self.net_model) for net in spec.networks],
            notes=spec.notes + self.notes,
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


def defaults_from_guest(os_info: Mapping[str, Any] | None, has_esp: bool) -> GuestDefaults:
    """How to present this guest to KVM: firmware, machine, buses, clock.

    `os_info` is an `OSInfo.to_dict()` (None when inspection found no OS);
    `has_esp` says whether the disk has an EFI system partition.
    """
    info: Mapping[str, Any] = os_info or {}
    # A guest installed for UEFI boots from its ESP and has no MBR boot code worth
    # trusting; one without an ESP was installed for BIOS. Copying the source's
    # firmware is what keeps the bootloader working unchanged.
    uefi = has_esp
    arch = _arch(info)
    if info.get("type") == "windows":
        return GuestDefaults(
            uefi=uefi,
            arch=arch,
            # virtio for Windows too: far faster than emulated SATA/e1000, but the
            # guest has no inbox drivers for it (see WINDOWS_VIRTIO_NOTE).
            disk_bus="virtio",
            net_model="virtio",
            # Hyper-V enlightenments: Windows detects them and avoids spinlock and
            # APIC exits that otherwise make it noticeably slow under KVM.
            hyperv=True,
            # Windows keeps the RTC in local time; a UTC RTC shifts its clock.
            clock_offset="localtime",
            # No inbox virtio-gpu driver; plain VGA works from first boot.
            video_model="vga",
            notes=(WINDOWS_VIRTIO_NOTE,),
        )
    return GuestDefaults(uefi=uefi, arch=arch)
