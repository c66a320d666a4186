"""Filesystem probing with `blkid -p`: parse (pure) and run (edge)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft import commands

# blkid exits 2 when it finds nothing to report on the device.
BLKID_NOTHING_FOUND = 2


@dataclass(frozen=True)
class Filesystem:
    """What blkid found on one partition of the disk."""

    partition: int  # partition number on THIS disk
    type: str | None  # ext4, xfs, btrfs, vfat, ntfs, swap, ... or None
    uuid: str | None = None
    label: str | None = None
    partuuid: str | None = None
    partlabel: str | None = None
    usage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Filesystem:
        return cls(**data)


# Host-local facts that must not be cached or reported as facts about the disk:
# the device name is reused by the next attach.
HOST_LOCAL_TAGS = frozenset({"DEVNAME"})


def parse_blkid_export(text: str) -> dict[str, str]:
    """Parse `blkid -p -o export` output (KEY=value lines) into a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key and key not in HOST_LOCAL_TAGS:
            values[key] = value.strip()
    return values


def parse_blkid_export_many(text: str) -> dict[str, dict[str, str]]:
    """Split `blkid -p -o export DEV...` output into {device: tags} (pure).

    blkid prints one block per recognised device, blocks separated by a blank
    line, each starting with DEVNAME; unrecognised devices print nothing.
    """
    found: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        devname = None
        for line in block.splitlines():
            if line.startswith("DEVNAME="):
                devname = line.partition("=")[2].strip()
                break
        if devname:
            found[devname] = parse_blkid_export(block)
    return found


def run_blkid(*devices: str, timeout: float = 30.0) -> dict[str, dict[str, str]]:
    """Low-level probe of each device in ONE blkid process: {device: tags}.

    One process for many partitions costs about what one probe does; a device
    with nothing recognisable maps to an empty dict.
    """
    result = commands.run(
        ["blkid", "-p", "-o", "export", *devices],
        timeout=timeout,
        ok_codes=(0, BLKID_NOTHING_FOUND),
    )
    found = parse_blkid_export_many(result.stdout)
    return {device: found.get(device, {}) for device in devices}


def filesystem_from_blkid(
    number: int, tags: dict[str, str], *, partuuid: str | None = None, partlabel: str | None = None
) -> Filesystem:
    """Combine blkid tags of a partition device with what the partition table says."""
    return Filesystem(
        partition=number,
        type=tags.get("TYPE"),
        uuid=tags.get("UUID"),
        label=tags.get("LABEL"),
        partuuid=tags.get("PART_ENTRY_UUID") or partuuid,
        partlabel=tags.get("PART_ENTRY_NAME") or partlabel,
        usage=tags.get("USAGE"),
    )


EXT_SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = 0xEF53
EXT_INCOMPAT_RECOVER = 0x4


def ext_superblock_needs_recovery(superblock: bytes) -> bool:
    """True when an ext2/3/4 superblock says its journal must be replayed (pure)."""
    if len(superblock) < 0x64:
        return False
    magic = int.from_bytes(superblock[0x38:0x3A], "little")
    if magic != EXT_MAGIC:
        return False
    incompat = int.from_bytes(superblock[0x60:0x64], "little")
    return bool(incompat & EXT_INCOMPAT_RECOVER)


def ext_needs_recovery(device: str) -> bool:
    """Read the superblock directly: cheaper than a dumpe2fs process per mount."""
    try:
        with open(device, "rb") as fh:
            fh.seek(EXT_SUPERBLOCK_OFFSET)
            return ext_superblock_needs_recovery(fh.read(1024))
    except OSError:
        return False
