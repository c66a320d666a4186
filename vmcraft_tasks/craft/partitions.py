"""Partition tables: parse `sfdisk -J` output into records (pure), and read it (edge)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError, PartitionError

# MBR type codes that mark an extended partition (a container for logical ones).
EXTENDED_MBR_TYPES = frozenset({"5", "f", "85"})

# Partition types whose contents blkid often cannot name (no filesystem signature
# by design): the scan reports them by what the table says they are.
KNOWN_TYPES: dict[str, str] = {
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot partition",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved partition",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system partition",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery partition",
    "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3": "Windows LDM metadata",
    "af9b60a0-1431-4f62-bc68-3311714a69ad": "Windows LDM data",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "Linux LUKS",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "82": "Linux swap",
    "83": "Linux",
    "8e": "Linux LVM",
    "fd": "Linux RAID",
    "ef": "EFI system partition",
    "7": "NTFS/exFAT/HPFS",
    "27": "hidden recovery partition",
    "42": "Windows LDM",
    "0": "empty",
}


@dataclass(frozen=True)
class Partition:
    number: int
    start_sector: int
    size_sectors: int
    sector_size: int
    type: str
    table: str  # "gpt" or "dos"
    name: str | None = None
    uuid: str | None = (
        None  # GPT partition UUID, or MBR "<disk id>-<nn>" (what blkid calls PARTUUID)
    )
    bootable: bool = False
    extended: bool = False
    device: str | None = None  # block device path once the backend exposes the partition

    @property
    def offset_bytes(self) -> int:
        return self.start_sector * self.sector_size

    @property
    def size_bytes(self) -> int:
        return self.size_sectors * self.sector_size

    @property
    def type_name(self) -> str:
        """What the partition table says this partition is, in words."""
        return KNOWN_TYPES.get(self.type.lower(), f"type {self.type}")

    @property
    def logical(self) -> bool:
        return self.table == "dos" and self.number >= 5

    def with_device(self, device: str) -> Partition:
        return replace(self, device=device)

    def to_dict(self) -> dict[str, Any]:
        """Facts about the disk only: the block device is host-local and left out."""
        data = asdict(self)
        del data["device"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        return cls(**{k: v for k, v in data.items() if k != "device"})


def _number_from_node(node: str) -> int:
    digits = ""
    for ch in reversed(node):
        if not ch.isdigit():
            break
        digits = ch + digits
    if not digits:
        raise PartitionError(f"partition node without a number: {node!r}")
    return int(digits)


def _mbr_partuuid(disk_id: str | None, number: int) -> str | None:
    if not disk_id:
        return None
    return f"{disk_id.lower().removeprefix('0x').zfill(8)}-{number:02d}"


def parse_sfdisk_json(text: str) -> list[Partition]:
    """Turn `sfdisk -J` output into partition records, ordered by number.

    An empty or missing table yields an empty list; garbage raises PartitionError.
    """
    if not text.strip():
        return []
    try:
        table = json.loads(text)["partitiontable"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PartitionError(f"unreadable sfdisk output: {exc}") from exc
    label = table.get("label", "")
    sector_size = int(table.get("sectorsize", 512))
    disk_id = table.get("id")
    parts = []
    for raw in table.get("partitions", []):
        number = _number_from_node(raw["node"])
        ptype = str(raw.get("type", "")).lower()
        uuid = raw.get("uuid")
        if label == "dos":
            uuid = _mbr_partuuid(disk_id, number)
        parts.append(
            Partition(
                number=number,
                start_sector=int(raw["start"]),
                size_sectors=int(raw["size"]),
                sector_size=sector_size,
                type=ptype,
                table=label,
                name=raw.get("name"),
                uuid=uuid.lower() if uuid else None,
                bootable=bool(raw.get("bootable", False)),
                extended=label == "dos" and ptype in EXTENDED_MBR_TYPES,
            )
        )
    return sorted(parts, key=lambda p: p.number)


def read_partition_table(disk_path: str, *, timeout: float = 30.0) -> list[Partition]:
    """Read the table of a whole-disk file or block device with `sfdisk -J`."""
    try:
        result = commands.run(["sfdisk", "-J", disk_path], timeout=timeout)
    except CommandError as exc:
        if "does not contain a recognized partition table" in exc.stderr:
            return []
        raise PartitionError(f"cannot read the partition table of {disk_path}: {exc}") from exc
    return parse_sfdisk_json(result.stdout)


def data_partitions(parts: list[Partition]) -> list[Partition]:
    """Partitions that can hold a filesystem (extended containers excluded)."""
    return [p for p in parts if not p.extended]
