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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vmcraft_tasks.craft.fixes.model import Change
from vmcraft_tasks.craft.inspect.fstab import (
    KIND_DEVICE,
    FstabEntry,
    classify_entry,
    parse_fstab,
    resolve_spec,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

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


@dataclass(frozen=True)
class _RootDisk:
    """What the fstab's own "/" entry says about how the guest named this disk."""

    disk: str | None  # this disk's name in the guest, when the "/" entry proves it
    suspect: str | None  # a disk name the "/" entry contradicts
    reason: str | None = None


def _root_disk(entries: Sequence[FstabEntry], root_partition: int | None) -> _RootDisk:
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
        disk, number = split
        if number == root_partition:
            return _RootDisk(disk, None)
        reason = (
            f"fstab mounts / from partition {number} of {disk} but the root filesystem "
            f"is partition {root_partition}: the guest's disk names cannot be trusted"
        )
        return _RootDisk(None, disk, reason)
    return _RootDisk(None, None)


def _partition_exists(
    number: int, filesystems: Sequence[Filesystem], partitions: Sequence[Partition]
) -> str | None:
    for part in partitions:
        if part.number == number and part.extended:
            return f"partition {number} is an extended partition container"
    known = {p.number for p in partitions} | {fs.partition for fs in filesystems}
    return None if number in known else f"this disk has no partition {number}"


def _partition_for(
    entry: FstabEntry,
    root: _RootDisk,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
) -> tuple[int | None, str | None]:
    split = split_partition_name(entry.spec)
    if split is not None and root.suspect is not None and split[0] == root.suspect:
        return None, root.reason
    if root.disk is not None and split is not None:
        disk, number = split
        if disk != root.disk:
            return None, f"{entry.spec} is on another disk of the guest (/ is on {root.disk})"
        problem = _partition_exists(number, filesystems, partitions)
        return (None, problem) if problem else (number, None)
    found = resolve_spec(entry.spec, filesystems, partitions)
    return found.partition, found.reason


def _uuid_for(
    entry: FstabEntry, number: int, filesystems: Sequence[Filesystem]
) -> tuple[str | None, str | None]:
    found = [fs for fs in filesystems if fs.partition == number]
    if len(found) != 1 or not found[0].uuid:
        return None, f"partition {number} has no filesystem UUID"
    fs = found[0]
    uuid = fs.uuid or ""
    sharing = sorted(f.partition for f in filesystems if (f.uuid or "").lower() == uuid.lower())
    if len(sharing) > 1:
        listed = ", ".join(str(n) for n in sharing)
        return None, f"UUID {uuid} is shared by partitions {listed} (cloned filesystems)"
    if not _types_agree(entry.fstype, fs.type):
        return None, f"fstab says {entry.fstype} but partition {number} holds {fs.type}"
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
) -> tuple[str, list[Change], list[Unresolved]]:
    """Rewrite hardware-dependent device specs (swap included) to UUID=<uuid>.

    Only the spec field of a rewritten line changes; every other line, comment and
    spacing is kept byte for byte. `root_partition` (where the root filesystem was
    found) lets by-id/by-path names be mapped and contradicting names be refused.
    Returns the new text, the changes, and the entries left alone with the reason.
    """
    lines = text.splitlines(keepends=True)
    entries = parse_fstab(text)
    root = _root_disk(entries, root_partition)
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
        number, reason = _partition_for(entry, root, filesystems, partitions)
        uuid = None
        if number is not None:
            uuid, reason = _uuid_for(entry, number, filesystems)
        if uuid is None:
            unresolved.append(Unresolved(body, reason or f"cannot map {entry.spec}"))
            out.append(line)
            continue
        indent, _spec, rest = match.groups()
        new_body = f"{indent}UUID={uuid}{rest}"
        out.append(new_body + ending)
        changes.append(
            Change(body, new_body, f"{entry.spec} is partition {number}; its name changes on KVM")
        )
    return "".join(out), changes, unresolved
