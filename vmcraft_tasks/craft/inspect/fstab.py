"""/etc/fstab: parse entries and map each one to a partition number of THIS disk (pure).

The guest's fstab names devices as the guest saw them. On the host those names mean
something else entirely (/dev/sda1 is the host's own disk), so a spec is only ever
resolved to a partition NUMBER of the inspected disk, by matching filesystem and
partition-table identifiers; a host device path is never produced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import VolumeTable, disk_index, disk_volume, split_mapper_name

KIND_DEVICE = "device"
KIND_VIRTUAL = "virtual"
KIND_NETWORK = "network"
KIND_BIND = "bind"
KIND_SWAPFILE = "swapfile"
KIND_FILE = "file"
KIND_UNKNOWN = "unknown"

VIRTUAL_FSTYPES = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "proc",
        "pstore",
        "ramfs",
        "rpc_pipefs",
        "securityfs",
        "sysfs",
        "tmpfs",
        "tracefs",
        "usbfs",
    }
)
NETWORK_FSTYPES = frozenset(
    {
        "afs",
        "ceph",
        "cifs",
        "davfs",
        "fuse.sshfs",
        "glusterfs",
        "lustre",
        "ncpfs",
        "nfs",
        "nfs4",
        "smb3",
        "smbfs",
        "sshfs",
    }
)
# Specs that name no device; the kernel ignores them for pseudo filesystems.
_PSEUDO_SPECS = frozenset({"none", "proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "cgroup"})

_TAGS = {"UUID": "uuid", "LABEL": "label", "PARTUUID": "partuuid", "PARTLABEL": "partlabel"}
_BY_DIRS = {
    "/dev/disk/by-uuid/": "uuid",
    "/dev/disk/by-label/": "label",
    "/dev/disk/by-partuuid/": "partuuid",
    "/dev/disk/by-partlabel/": "partlabel",
}
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")
_UDEV_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
_NETWORK_SPEC = re.compile(r"^(?:\[[^\]]+\]|[^/:=\s]+):/|^//[^/]")
# Names a guest gives its first disk's partitions under the common drivers.
_LETTER_DISK = re.compile(r"^/dev/(?:sd|hd|vd|xvd)([a-z]+)(\d*)$")
_NVME = re.compile(r"^/dev/nvme(\d+)n(\d+)(?:p(\d+))?$")
_MMC = re.compile(r"^/dev/mmcblk(\d+)(?:p(\d+))?$")


@dataclass(frozen=True)
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    freq: int
    passno: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"] = list(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FstabEntry:
        return cls(
            spec=data["spec"],
            mountpoint=data["mountpoint"],
            fstype=data["fstype"],
            options=tuple(data["options"]),
            freq=int(data["freq"]),
            passno=int(data["passno"]),
        )


@dataclass(frozen=True)
class SpecResolution:
    """Where a device spec points on this disk; `partition` is None when it cannot say."""

    partition: int | None
    how: str  # the spec style: uuid, label, partuuid, partlabel, device-name, lvm, ...
    reason: str | None = None  # why it is unresolved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedFstabEntry:
    entry: FstabEntry
    kind: str  # device, virtual, network, bind, swapfile, file, unknown
    resolved_partition: int | None
    how: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.entry.to_dict(),
            "kind": self.kind,
            "resolved_partition": self.resolved_partition,
            "how": self.how,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedFstabEntry:
        """The inverse of the flat `to_dict()` (reports travel between hosts as JSON)."""
        return cls(
            entry=FstabEntry.from_dict(data),
            kind=data["kind"],
            resolved_partition=data["resolved_partition"],
            how=data["how"],
            reason=data.get("reason"),
        )


def _decode(pattern: re.Pattern[bytes], base: int, text: str) -> str:
    # Escapes encode bytes, and several of them can form one UTF-8 character
    # (\303\251 is "é"), so substitute on bytes and decode once at the end.
    raw = text.encode("utf-8", errors="surrogateescape")
    decoded = pattern.sub(lambda m: bytes([int(m.group(1), base) & 0xFF]), raw)
    return decoded.decode("utf-8", errors="replace")


def decode_octal_escapes(field: str) -> str:
    r"""Undo fstab's octal escapes: "\040" is a space, "\134" a backslash."""
    return _decode(_OCTAL_ESCAPE, 8, field)


def decode_udev_escapes(name: str) -> str:
    r"""Undo udev's escapes in /dev/disk/by-* names: "\x20" is a space."""
    return _decode(_UDEV_ESCAPE, 16, name)


def _int_field(fields: list[str], index: int) -> int:
    try:
        return int(fields[index])
    except (IndexError, ValueError):
        return 0


def parse_fstab(text: str) -> list[FstabEntry]:
    """Parse fstab text into entries; comments, blank and one-field lines are skipped.

    Missing trailing fields take mount(8)'s defaults (auto, defaults, 0, 0).
    """
    entries = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        fstype = decode_octal_escapes(fields[2]) if len(fields) > 2 else "auto"
        options = decode_octal_escapes(fields[3]) if len(fields) > 3 else "defaults"
        entries.append(
            FstabEntry(
                spec=decode_octal_escapes(fields[0]),
                mountpoint=decode_octal_escapes(fields[1]),
                fstype=fstype,
                options=tuple(opt for opt in options.split(",") if opt),
                freq=_int_field(fields, 4),
                passno=_int_field(fields, 5),
            )
        )
    return entries


def _tag(spec: str) -> tuple[str, str] | None:
    """(style, value) of a TAG=value or /dev/disk/by-*/value spec."""
    key, sep, value = spec.partition("=")
    if sep and key in _TAGS:
        return _TAGS[key], value.strip().strip("\"'")
    for prefix, style in _BY_DIRS.items():
        if spec.startswith(prefix):
            return style, decode_udev_escapes(spec[len(prefix) :])
    return None


def classify_entry(entry: FstabEntry) -> str:
    """What an fstab entry mounts: a block device, a pseudo filesystem, a share, ..."""
    spec, fstype = entry.spec, entry.fstype
    if "bind" in entry.options or "rbind" in entry.options:
        return KIND_BIND
    if fstype in NETWORK_FSTYPES or _NETWORK_SPEC.match(spec):
        return KIND_NETWORK
    if fstype in VIRTUAL_FSTYPES or spec in _PSEUDO_SPECS:
        return KIND_VIRTUAL
    if _tag(spec) is not None or spec.startswith("/dev/"):
        return KIND_DEVICE
    if fstype == "swap":
        return KIND_SWAPFILE
    if spec.startswith("/"):
        return KIND_FILE
    return KIND_UNKNOWN


def _unique(how: str, spec: str, numbers: Iterable[int]) -> SpecResolution:
    found = sorted(set(numbers))
    if len(found) == 1:
        return SpecResolution(found[0], how)
    if not found:
        return SpecResolution(None, how, f"no partition of this disk matches {spec}")
    listed = ", ".join(str(n) for n in found)
    return SpecResolution(None, how, f"ambiguous: partitions {listed} all match {spec}")


def _by_tag(
    style: str,
    value: str,
    spec: str,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
) -> SpecResolution:
    if style == "uuid":
        # blkid prints FAT/NTFS serials upper case while fstabs vary; UUIDs are hex.
        wanted = value.lower()
        hits = [fs.partition for fs in filesystems if fs.uuid and fs.uuid.lower() == wanted]
    elif style == "label":
        hits = [fs.partition for fs in filesystems if fs.label == value]
    elif style == "partuuid":
        wanted = value.lower()
        hits = [fs.partition for fs in filesystems if (fs.partuuid or "").lower() == wanted]
        hits += [p.number for p in partitions if (p.uuid or "").lower() == wanted]
    else:
        hits = [fs.partition for fs in filesystems if fs.partlabel == value]
        hits += [p.number for p in partitions if p.name == value]
    return _unique(style, spec, hits)


def _by_number(
    number: int,
    spec: str,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    *,
    where: str = "this disk",
    shown: int | None = None,
) -> SpecResolution:
    how = "device-name"
    for part in partitions:
        if part.number == number and part.extended:
            return SpecResolution(None, how, f"{spec} is an extended partition container")
    known = {p.number for p in partitions} | {fs.partition for fs in filesystems}
    if number not in known:
        return SpecResolution(None, how, f"{where} has no partition {shown or number}")
    return SpecResolution(number, how)


def _on_disk(
    index: int | None,
    number: str | None,
    spec: str,
    *,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None,
) -> SpecResolution:
    """Partition `number` (None: the whole disk) of the guest's disk `index`."""
    how = "device-name"
    if index != 0 and (volumes is None or index is None or index >= volumes.disks()):
        return SpecResolution(None, how, f"{spec} is on another disk of the guest")
    assert index is not None
    if not number:
        whole = disk_volume(index, 0)
        if index != 0 and any(fs.partition == whole and fs.type for fs in filesystems):
            return SpecResolution(whole, how)
        return SpecResolution(None, how, f"{spec} is a whole disk, not a partition")
    where = "this disk" if volumes is None else f"disk {index + 1} of the VM"
    return _by_number(
        disk_volume(index, int(number)),
        spec,
        filesystems,
        partitions,
        where=where,
        shown=int(number),
    )


def _by_lv_name(vg: str, lv: str, spec: str, volumes: VolumeTable | None) -> SpecResolution:
    if volumes is None:
        return SpecResolution(None, "lvm", "LVM logical volumes are not partitions")
    found = volumes.lvs_named(vg, lv)
    if len(found) == 1:
        return SpecResolution(found[0].number, "lvm")
    if not found:
        return SpecResolution(None, "lvm", f"{spec}: this VM has no LV {vg}/{lv}")
    return SpecResolution(None, "lvm", f"ambiguous: {len(found)} VGs named {vg} have an LV {lv}")


def _by_device_name(
    spec: str,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> SpecResolution:
    if match := _LETTER_DISK.match(spec):
        letters, number = match.groups()
        return _on_disk(
            disk_index(letters),
            number,
            spec,
            filesystems=filesystems,
            partitions=partitions,
            volumes=volumes,
        )
    if match := _NVME.match(spec):
        controller, namespace, number = match.groups()
        index = int(controller) if namespace == "1" else None
        return _on_disk(
            index, number, spec, filesystems=filesystems, partitions=partitions, volumes=volumes
        )
    if match := _MMC.match(spec):
        card, number = match.groups()
        return _on_disk(
            int(card), number, spec, filesystems=filesystems, partitions=partitions, volumes=volumes
        )
    if spec.startswith("/dev/mapper/"):
        names = split_mapper_name(spec[len("/dev/mapper/") :])
        if names is not None and volumes is not None:
            return _by_lv_name(*names, spec, volumes)
        return SpecResolution(None, "device-mapper", "device-mapper volumes are not partitions")
    if re.match(r"^/dev/dm-\d+$", spec):
        return SpecResolution(None, "device-mapper", "device-mapper volumes are not partitions")
    if re.match(r"^/dev/md(?:\d+|/.+)$", spec):
        return SpecResolution(None, "md", "software RAID devices are not partitions")
    if spec.startswith(("/dev/disk/by-id/", "/dev/disk/by-path/")):
        return SpecResolution(None, "by-id", "by-id/by-path names depend on the guest's hardware")
    if match := re.match(r"^/dev/([^/]+)/([^/]+)$", spec):
        # /dev/<vg>/<lv> is how LVM names logical volumes.
        return _by_lv_name(match.group(1), match.group(2), spec, volumes)
    return SpecResolution(None, "device-name", f"unrecognised device name {spec}")


def resolve_spec(
    spec: str,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> SpecResolution:
    """Map one fstab device spec to a partition number of this disk, or, given the
    VM's `volumes` (filesystems and partitions numbered VM-wide), to a volume of any
    of its disks or LVs: `/dev/sdb2` by disk order, `/dev/mapper/VG-LV`, `/dev/VG/LV`."""
    tag = _tag(spec)
    if tag is not None:
        style, value = tag
        return _by_tag(style, value, spec, filesystems, partitions)
    if spec.startswith("/dev/"):
        return _by_device_name(spec, filesystems, partitions, volumes)
    return SpecResolution(None, "none", f"{spec} does not name a block device")


def resolve_entry(
    entry: FstabEntry,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> ResolvedFstabEntry:
    kind = classify_entry(entry)
    if kind != KIND_DEVICE:
        return ResolvedFstabEntry(entry, kind, None, "none", f"{kind} mount, not a partition")
    found = resolve_spec(entry.spec, filesystems, partitions, volumes)
    return ResolvedFstabEntry(entry, kind, found.partition, found.how, found.reason)


def resolve_fstab(
    entries: Iterable[FstabEntry],
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> list[ResolvedFstabEntry]:
    """Resolve every entry; non-device entries are kept with no partition."""
    return [resolve_entry(entry, filesystems, partitions, volumes) for entry in entries]
