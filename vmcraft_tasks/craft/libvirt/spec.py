"""What a domain is made of: plain, frozen value objects with their own sanity checks.

The spec holds decisions, not policy: which bus, which firmware and so on are
filled in by `defaults.GuestDefaults.apply` from what inspection found (the disk bus
and NIC model from the guest's `GuestCaps`), so the renderer stays a straight
translation and can be golden-file tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from vmcraft_tasks.craft.guestcaps import GuestCaps
from vmcraft_tasks.craft.libvirt.errors import DomainSpecError

DiskFormat = Literal["qcow2", "raw"]
DiskBus = Literal["virtio", "sata", "scsi"]
ClockOffset = Literal["utc", "localtime"]
VideoModel = Literal["virtio", "vga", "qxl", "bochs"]

# The target name is what the guest's firmware and old-style /dev names see, and
# libvirt derives the controller address from it: a name that does not match the
# bus ("sda" on virtio) works but confuses everyone reading the XML later.
_TARGET_PREFIX: dict[str, str] = {"virtio": "vd", "sata": "sd", "scsi": "sd"}
_TARGET_DEV = re.compile(r"^(vd|sd)[a-z]{1,3}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# libvirt rejects '/' in names (they become file names under /etc/libvirt/qemu);
# control characters make `virsh list` output unreadable.
_BAD_NAME = re.compile(r"[/\x00-\x1f\x7f]")


def target_dev_for(bus: DiskBus, target_dev: str) -> str:
    """`target_dev` renamed for `bus`, keeping its letters: vdb on SATA becomes sdb."""
    if not _TARGET_DEV.match(target_dev):
        raise DomainSpecError(f"bad target device {target_dev!r}")
    return _TARGET_PREFIX[bus] + target_dev[2:]


@dataclass(frozen=True)
class DiskSpec:
    """One converted disk image as the guest will see it."""

    path: str
    format: DiskFormat
    target_dev: str  # vda, vdb, ...
    bus: DiskBus = "virtio"

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            # libvirt resolves relative paths against its daemon's cwd, not ours.
            raise DomainSpecError(f"disk path must be absolute: {self.path!r}")
        if self.format not in get_args(DiskFormat):
            raise DomainSpecError(f"disk {self.path}: unsupported format {self.format!r}")
        if self.bus not in get_args(DiskBus):
            raise DomainSpecError(f"disk {self.path}: unsupported bus {self.bus!r}")
        if not _TARGET_DEV.match(self.target_dev):
            raise DomainSpecError(f"disk {self.path}: bad target device {self.target_dev!r}")


@dataclass(frozen=True)
class NetSpec:
    """One NIC on a libvirt network."""

    network: str = "default"
    model: str = "virtio"
    mac: str | None = None  # None: libvirt picks one in 52:54:00 when defining

    def __post_init__(self) -> None:
        if self.mac is not None and not _MAC.match(self.mac):
            # Lower case only: libvirt normalises to lower case, and a golden file or
            # a diff against `virsh dumpxml` should not differ by case alone.
            raise DomainSpecError(f"bad MAC address {self.mac!r} (want aa:bb:cc:dd:ee:ff)")
        if self.mac is not None and int(self.mac[:2], 16) & 1:
            raise DomainSpecError(f"MAC address {self.mac} is multicast")


@dataclass(frozen=True)
class DomainSpec:
    """A whole KVM domain.

    `os_info` is an `OSInfo.to_dict()`, used for libosinfo metadata; `guestcaps` is
    what the disk bus and NIC model were chosen from, written to the metadata too.
    """

    name: str
    memory_mib: int
    vcpus: int
    disks: list[DiskSpec]
    networks: list[NetSpec]
    uefi: bool = False
    os_info: dict[str, Any] | None = None
    machine: str = "q35"
    arch: str = "x86_64"
    hyperv: bool = False
    clock_offset: ClockOffset = "utc"
    video_model: VideoModel = "virtio"
    guestcaps: GuestCaps | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.name or _BAD_NAME.search(self.name):
            raise DomainSpecError(f"bad domain name {self.name!r}")
        if self.memory_mib <= 0 or self.vcpus <= 0:
            raise DomainSpecError(
                f"{self.name}: memory_mib and vcpus must be positive "
                f"(got {self.memory_mib}, {self.vcpus})"
            )
        if not self.disks:
            # Nothing to boot from: a migration always brings at least the system disk.
            raise DomainSpecError(f"{self.name}: no disks")
        seen: set[str] = set()
        for disk in self.disks:
            if disk.target_dev in seen:
                raise DomainSpecError(f"{self.name}: target {disk.target_dev} used twice")
            seen.add(disk.target_dev)
            if not disk.target_dev.startswith(_TARGET_PREFIX[disk.bus]):
                raise DomainSpecError(
                    f"{self.name}: disk {disk.path} on {disk.bus} needs a "
                    f"{_TARGET_PREFIX[disk.bus]}* target, not {disk.target_dev}"
                )
        macs = [net.mac for net in self.networks if net.mac is not None]
        if len(macs) != len(set(macs)):
            raise DomainSpecError(f"{self.name}: the same MAC address on two NICs")
        if self.clock_offset not in get_args(ClockOffset):
            raise DomainSpecError(f"{self.name}: bad clock offset {self.clock_offset!r}")
        if self.video_model not in get_args(VideoModel):
            raise DomainSpecError(f"{self.name}: bad video model {self.video_model!r}")

    @property
    def memory_kib(self) -> int:
        return self.memory_mib * 1024
