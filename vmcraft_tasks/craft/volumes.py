"""A VM's volumes: every place a filesystem can live, on all of its disks and LVs (pure).

The rest of the library names a filesystem by a number (`Filesystem.partition`,
`OSInfo.root_partition`, mount results): on a one-disk VM that is the partition number
of its disk. A VM with several disks, or with LVM, numbers its volumes VM-wide:

- the boot disk's (disk 0's) partitions keep their own numbers, and its whole-disk
  filesystem is 0, so a one-disk VM is described exactly as before;
- partition `p` of disk `k` (k >= 1, in the manifest's order) is `k * 1000 + p`, and a
  filesystem on the whole of disk `k` is `k * 1000`;
- LVs are numbered from 100000, in the order of their VG's uuid and their name (VGs
  are told apart by uuid: two VGs named `rl` are two VGs).

The numbers are only labels: code maps them through `VolumeTable`, never by arithmetic,
and reports say what a volume is (`Volume.label`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from vmcraft_tasks.craft.partitions import Partition

DISK_STRIDE = 1000
LV_BASE = 100_000
MAX_PARTITIONS = DISK_STRIDE - 1
# A guest's names for its disks, in the order the VM's bus presents them.
_LETTERS = re.compile(r"^[a-z]+$")


class VolumeTableError(ValueError):
    """A volume layout the numbering cannot hold (too many disks or partitions)."""


@dataclass(frozen=True)
class Volume:
    number: int
    # A partition (or, with partition 0, the whole) of disk `disk`; or LV `vg`/`lv`.
    disk: int | None = None
    partition: int | None = None
    vg: str | None = None
    vg_uuid: str | None = None
    lv: str | None = None

    @property
    def is_lv(self) -> bool:
        return self.lv is not None

    @property
    def label(self) -> str:
        """What the volume is, in words (reports, reasons)."""
        if self.lv is not None:
            return f"LV {self.vg}/{self.lv}"
        if self.disk == 0:
            return "the whole disk" if self.partition == 0 else f"partition {self.partition}"
        if self.partition == 0:
            return f"disk {self.disk_number} (whole disk)"
        return f"disk {self.disk_number} partition {self.partition}"

    @property
    def disk_number(self) -> int:
        """The disk's position counted from 1, as people count disks."""
        return (self.disk or 0) + 1


@dataclass(frozen=True)
class LVName:
    vg: str
    lv: str
    vg_uuid: str


class VolumeTable:
    """The numbering of one VM's volumes (see the module doc)."""

    def __init__(self, volumes: Iterable[Volume]) -> None:
        self._by_number: dict[int, Volume] = {}
        for volume in volumes:
            if volume.number in self._by_number:
                raise VolumeTableError(f"volume number {volume.number} used twice")
            self._by_number[volume.number] = volume

    @classmethod
    def build(cls, disks: Sequence[Sequence[Partition]], lvs: Iterable[LVName] = ()) -> VolumeTable:
        """Number the partitions of every disk (disk 0 first) and the LVs."""
        volumes: list[Volume] = []
        for index, parts in enumerate(disks):
            if index >= LV_BASE // DISK_STRIDE:
                raise VolumeTableError(f"a VM of more than {LV_BASE // DISK_STRIDE - 1} disks")
            volumes.append(Volume(disk_volume(index, 0), disk=index, partition=0))
            for part in parts:
                if part.number > MAX_PARTITIONS:
                    raise VolumeTableError(
                        f"disk {index + 1} has a partition {part.number} "
                        f"(at most {MAX_PARTITIONS} per disk)"
                    )
                volumes.append(
                    Volume(disk_volume(index, part.number), disk=index, partition=part.number)
                )
        ordered = sorted(set(lvs), key=lambda n: (n.vg_uuid, n.lv))
        for offset, name in enumerate(ordered):
            volumes.append(Volume(LV_BASE + offset, vg=name.vg, vg_uuid=name.vg_uuid, lv=name.lv))
        return cls(volumes)

    def volumes(self) -> list[Volume]:
        return sorted(self._by_number.values(), key=lambda v: v.number)

    def __len__(self) -> int:
        return len(self._by_number)

    def get(self, number: int) -> Volume | None:
        return self._by_number.get(number)

    def on_disk(self, disk: int, partition: int) -> Volume | None:
        """Partition `partition` (0: the whole disk) of disk `disk` (0: the boot disk)."""
        volume = self._by_number.get(disk_volume(disk, partition))
        return volume if volume is not None and not volume.is_lv else None

    def disks(self) -> int:
        return len({v.disk for v in self._by_number.values() if v.disk is not None})

    def lvs_named(self, vg: str, lv: str) -> list[Volume]:
        """Every LV `vg`/`lv` (more than one when two VGs share a name)."""
        return [v for v in self._by_number.values() if v.vg == vg and v.lv == lv]

    def vm_partitions(self, disks: Sequence[Sequence[Partition]]) -> list[Partition]:
        """The disks' partitions renumbered VM-wide (for matching PARTUUID/PARTLABEL)."""
        return [
            replace(part, number=disk_volume(index, part.number))
            for index, parts in enumerate(disks)
            for part in parts
        ]


def disk_volume(disk: int, partition: int) -> int:
    """The volume number of partition `partition` (0: whole disk) of disk `disk`."""
    return partition if disk == 0 else disk * DISK_STRIDE + partition


def disk_index(letters: str) -> int | None:
    """`a` -> 0, `b` -> 1, ..., `z` -> 25, `aa` -> 26 (the kernel's sd/vd naming)."""
    if not _LETTERS.match(letters):
        return None
    index = 0
    for char in letters:
        index = index * 26 + (ord(char) - ord("a") + 1)
    return index - 1


def split_mapper_name(name: str) -> tuple[str, str] | None:
    """(VG, LV) of a device-mapper name: `rl-root`, `my--vg-lv--1` (`-` in a name is
    doubled). None when it is not a VG-LV name."""
    parts = re.split(r"(?<!-)-(?!-)", name)
    if len(parts) != 2 or not all(parts):
        return None
    vg, lv = (p.replace("--", "-") for p in parts)
    return vg, lv
