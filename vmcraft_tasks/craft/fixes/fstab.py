"""Rewrite hypervisor-dependent device names in /etc/fstab to UUID= (pure).

On VMware the guest's disks are /dev/sdX behind a SCSI controller (or /dev/hdX,
/dev/nvmeXnY, Xen's /dev/xvdX, and by-id/by-path names that embed the controller and
disk serial). On KVM with virtio-blk the same disk is /dev/vdX and none of those names
exist, so the guest drops to an emergency shell. A filesystem UUID moves with the
data, so it is the name that survives conversion. /dev/vdX is already a KVM name and is
left alone, as are LABEL=, UUID=, LVM and md names, which do not depend on the bus.

A wrong UUID is worse than a stale name (the wrong filesystem gets mounted), so an
entry is only rewritten when the partition is certain; everything else is left as it
is and reported.

Given the VM's `volumes` (filesystems and partitions numbered VM-wide, see
`craft.volumes`), names of the VM's other disks are mapped too, by the guest's disk
order: /dev/sdb2 is partition 2 of disk 2, /dev/sdb a filesystem on the whole of disk 2.
A name of a disk the VM does not have stays as it is, with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vmcraft_tasks.craft.fixes.model import Change
from vmcraft_tasks.craft.inspect.fstab import (
    KIND_DEVICE,
    FstabEntry,
    SpecResolution,
    classify_entry,
    parse_fstab,
    resolve_spec,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import VolumeTable, disk_index, disk_volume

# Device names that change when the disk moves to virtio (vdX is already virtio).
_HARDWARE_NAME = re.compile(
    r"^/dev/(?:(?:sd|hd|xvd)[a-z]+\d*|nvme\d+n\d+(?:p\d+)?|disk/by-(?:id|path)/.+)$"
)
# (disk, partition number) of a partition name, per naming style.
_PARTITION_NAMES = (
    re.compile(r"^(/dev/(?:sd|hd|vd|xvd)[a-z]+)(\d+)$"),
    re.compile(r"^(/dev/nvme\d+n\d+)p(\d+)$"),
    re.compile(r"^(/dev/disk/by-(?:id|path)/.+)-part(\d+)$"),
)
# fstab and blkid spell some types differently; these are the same filesystem to mount.
_TYPE_FAMILIES = {
    "ext2": "ext",
    "ext3": "ext",
    "ext4": "ext",
    "ext4dev": "ext",
    "msdos": "fat",
    "vfat": "fat",
    "fat": "fat",
    "ntfs": "ntfs",
    "ntfs3": "ntfs",
    "ntfs-3g": "ntfs",
}
_LINE = re.compile(r"^(\s*)(\S+)(.*)$", re.DOTALL)
# Names that say which of the guest's disks they are on, by its disk order.
_LETTER_DISK = re.compile(r"^/dev/(?:sd|hd|vd|xvd)([a-z]+)\d*$")
_NVME_DISK = re.compile(r"^/dev/nvme(\d+)n1(?:p\d+)?$")


@dataclass(frozen=True)
class Unresolved:
    """An entry with a hardware-dependent name that was left as it is."""

    line: str
    reason: str


def is_hardware_name(spec: str) -> bool:
    """True for device names that do not survive the move to virtio."""
    return _HARDWARE_NAME.match(spec) is not None


def split_partition_name(spec: str) -> tuple[str, int] | None:
    """("/dev/sdb", 2) for /dev/sdb2, (".../by-id/ata-X", 1) for .../ata-X-part1."""
    for pattern in _PARTITION_NAMES:
        if match := pattern.match(spec):
            return match.group(1), int(match.group(2))
    return None


def _family(fstype: str) -> str:
    return _TYPE_FAMILIES.get(fstype, fstype)


def _types_agree(fstab_type: str, blkid_type: str | None) -> bool:
    if blkid_type is None or fstab_type in ("", "auto"):
        return True
    # fstab allows a list ("udf,iso9660"): any one of them may be the real type.
    return any(_family(t) == _family(blkid_type) for t in fstab_type.split(",") if t)


def guest_disk_index(spec: str) -> int | None:
    """Which of the guest's disks (0: the first) a /dev/sdX, /dev/vdX, /dev/hdX,
    /dev/xvdX or /dev/nvmeNn1 name is on, by the guest's disk order; None for others."""
    if match := _LETTER_DISK.match(spec):
        return disk_index(match.group(1))
    if match := _NVME_DISK.match(spec):
        return int(match.group(1))
    return None


def volume_label(number: int, volumes: VolumeTable | None) -> str:
    """What volume `number` is, in words: "partition 2", or VM-wide "disk 2 partition 2"."""
    volume = volumes.get(number) if volumes is not None else None
    return volume.label if volume is not None else f"partition {number}"


def resolve_device(
    spec: str,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> SpecResolution:
    """`resolve_spec`, and given the VM's `volumes`, a clear reason for a name of a disk
    the VM does not have (`/dev/sdc1` on a VM of two disks)."""
    index = guest_disk_index(spec)
    if volumes is not None and index is not None and index >= volumes.disks():
        count = volumes.disks()
        return SpecResolution(
            None,
            "device-name",
            f"{spec} names the guest's disk {index + 1}, but the VM has "
            f"{count} disk{'' if count == 1 else 's'}",
        )
    return resolve_spec(spec, filesystems, partitions, volumes)


@dataclass(frozen=True)
class _RootDisk:
    """What the fstab's own "/" entry says about how the guest named this disk."""

    disk: str | None  # this disk's name in the guest, when the "/" entry proves it
    suspect: str | None  # a disk name the "/" entry contradicts
    reason: str | None = None
    index: int = 0  # which disk of the VM `disk` is (0 without `volumes`)
    # With `volumes`: the "/" entry contradicts the guest's disk order itself, so no
    # hardware name of any disk can be trusted.
    suspect_all: bool = False


def _root_disk(
    entries: Sequence[FstabEntry], root_partition: int | None, volumes: VolumeTable | None
) -> _RootDisk:
    # The fstab lives on the root filesystem, which is on this disk: if "/" is mounted
    # from <disk>N and the root was found on partition N, <disk> is this disk's name.
    if root_partition is None:
        return _RootDisk(None, None)
    for entry in entries:
        if entry.mountpoint != "/":
            continue
        split = split_partition_name(entry.spec)
        if split is None:
            return _RootDisk(None, None)
        if volumes is not None:
            return _root_disk_in_vm(entry.spec, split, root_partition, volumes)
        disk, number = split
        if number == root_partition:
            return _RootDisk(disk, None)
        reason = (
            f"fstab mounts / from partition {number} of {disk} but the root filesystem "
            f"is partition {root_partition}: the guest's disk names cannot be trusted"
        )
        return _RootDisk(None, disk, reason)
    return _RootDisk(None, None)


def _root_disk_in_vm(
    spec: str, split: tuple[str, int], root_partition: int, volumes: VolumeTable
) -> _RootDisk:
    disk, number = split
    volume = volumes.get(root_partition)
    index = guest_disk_index(spec)
    if (
        volume is not None
        and volume.disk is not None
        and volume.partition == number
        and index in (None, volume.disk)
    ):
        return _RootDisk(disk, None, index=volume.disk)
    found = volume.label if volume is not None else f"volume {root_partition}"
    reason = (
        f"fstab mounts / from {spec} but the root filesystem is {found}: "
        "the guest's disk names cannot be trusted"
    )
    return _RootDisk(None, disk, reason, suspect_all=True)


def _partition_exists(
    number: int,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    *,
    where: str = "this disk",
    shown: int | None = None,
) -> str | None:
    for part in partitions:
        if part.number == number and part.extended:
            return f"partition {shown or number} is an extended partition container"
    known = {p.number for p in partitions} | {fs.partition for fs in filesystems}
    return None if number in known else f"{where} has no partition {shown or number}"


def _partition_for(
    entry: FstabEntry,
    root: _RootDisk,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None,
) -> tuple[int | None, str | None]:
    split = split_partition_name(entry.spec)
    if root.suspect_all:
        return None, root.reason
    if split is not None and root.suspect is not None and split[0] == root.suspect:
        return None, root.reason
    if root.disk is not None and split is not None:
        disk, number = split
        if disk == root.disk:
            where = "this disk" if volumes is None else f"disk {root.index + 1} of the VM"
            volume = disk_volume(root.index, number)
            problem = _partition_exists(volume, filesystems, partitions, where=where, shown=number)
            return (None, problem) if problem else (volume, None)
        if volumes is None:
            return None, f"{entry.spec} is on another disk of the guest (/ is on {root.disk})"
    found = resolve_device(entry.spec, filesystems, partitions, volumes)
    return found.partition, found.reason


def _uuid_for(
    entry: FstabEntry,
    number: int,
    filesystems: Sequence[Filesystem],
    volumes: VolumeTable | None = None,
) -> tuple[str | None, str | None]:
    label = volume_label(number, volumes)
    found = [fs for fs in filesystems if fs.partition == number]
    if len(found) != 1 or not found[0].uuid:
        return None, f"{label} has no filesystem UUID"
    fs = found[0]
    uuid = fs.uuid or ""
    sharing = sorted(f.partition for f in filesystems if (f.uuid or "").lower() == uuid.lower())
    if len(sharing) > 1:
        if volumes is None:
            listed = ", ".join(str(n) for n in sharing)
            return None, f"UUID {uuid} is shared by partitions {listed} (cloned filesystems)"
        listed = ", ".join(volume_label(n, volumes) for n in sharing)
        return None, f"UUID {uuid} is shared by {listed} (cloned filesystems)"
    if not _types_agree(entry.fstype, fs.type):
        return None, f"fstab says {entry.fstype} but {label} holds {fs.type}"
    return uuid, None


def _split_ending(line: str) -> tuple[str, str]:
    body = line.rstrip("\r\n")
    return body, line[len(body) :]


def rewrite_fstab(
    text: str,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    *,
    root_partition: int | None = None,
    volumes: VolumeTable | None = None,
) -> tuple[str, list[Change], list[Unresolved]]:
    """Rewrite hardware-dependent device specs (swap included) to UUID=<uuid>.

    Only the spec field of a rewritten line changes; every other line, comment and
    spacing is kept byte for byte. `root_partition` (where the root filesystem was
    found) lets by-id/by-path names be mapped and contradicting names be refused.
    With the VM's `volumes`, `filesystems`, `partitions` and `root_partition` are
    numbered VM-wide and names of every disk of the VM are mapped (LVM names such as
    /dev/mapper/VG-LV and /dev/VG/LV are stable and are kept either way).
    Returns the new text, the changes, and the entries left alone with the reason.
    """
    lines = text.splitlines(keepends=True)
    entries = parse_fstab(text)
    root = _root_disk(entries, root_partition, volumes)
    out: list[str] = []
    changes: list[Change] = []
    unresolved: list[Unresolved] = []
    for line in lines:
        body, ending = _split_ending(line)
        parsed = parse_fstab(body)
        match = _LINE.match(body)
        if not parsed or match is None:
            out.append(line)
            continue
        entry = parsed[0]
        if classify_entry(entry) != KIND_DEVICE or not is_hardware_name(entry.spec):
            out.append(line)
            continue
        number, reason = _partition_for(entry, root, filesystems, partitions, volumes)
        uuid = None
        if number is not None:
            uuid, reason = _uuid_for(entry, number, filesystems, volumes)
        if uuid is None or number is None:
            unresolved.append(Unresolved(body, reason or f"cannot map {entry.spec}"))
            out.append(line)
            continue
        indent, _spec, rest = match.groups()
        new_body = f"{indent}UUID={uuid}{rest}"
        out.append(new_body + ending)
        changes.append(
            Change(
                body,
                new_body,
                f"{entry.spec} is {volume_label(number, volumes)}; its name changes on KVM",
            )
        )
    return "".join(out), changes, unresolved
