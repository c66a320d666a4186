"""Partition tables: parse `sfdisk -J` output into records (pure), and read it (edge)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError, PartitionError

# MBR type codes that mark an extended partition (a container for logical ones).
EXTENDED_MBR_TYPES = frozenset({"5", "f", "85"})


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
