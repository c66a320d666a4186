"""Filesystem probing with `blkid -p`: parse (pure) and run (edge)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft import commands

# blkid exits 2 when it finds nothing to report on the device, 8 when the low-level
# probe found more than one signature and will not pick one.
BLKID_NOTHING_FOUND = 2
BLKID_AMBIVALENT = 8
# Our own tag (never a blkid one) saying why a device has no TYPE; it travels with
# the other tags through the scan cache.
PROBE_TAG = "VMCRAFT_PROBE"
PROBE_NOTHING = "nothing"
PROBE_AMBIVALENT = "ambivalent"
CONTENT_TAG = "VMCRAFT_CONTENT"


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
    # Why no filesystem was identified, in words ("BIOS boot partition, no
    # filesystem signature"); None when `type` is set.
    content: str | None = None

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


def _blkid_batch(devices: list[str], timeout: float) -> tuple[dict[str, dict[str, str]], int]:
    result = commands.run(
        ["blkid", "-p", "-o", "export", *devices],
        timeout=timeout,
        ok_codes=(0, BLKID_NOTHING_FOUND, BLKID_AMBIVALENT),
    )
    return parse_blkid_export_many(result.stdout), result.returncode


def run_blkid(*devices: str, timeout: float = 30.0) -> dict[str, dict[str, str]]:
    """Low-level probe of each device: {device: tags}, with as few processes as is safe.

    `blkid -p` given several devices stops at the first one it cannot identify
    (exit 2, or 8 for an ambivalent result) and prints nothing for the devices
    after it: a BIOS boot or Microsoft reserved partition first would hide every
    filesystem behind it. So one batched run answers a prefix; the first device it
    left unanswered is the one it stopped at, and the rest go into the next batch:
    one process per unidentifiable partition, plus one. A device with nothing
    recognisable maps to `{PROBE_TAG: "nothing"}`, an ambivalent one to
    `{PROBE_TAG: "ambivalent"}`.
    """
    found: dict[str, dict[str, str]] = {}
    remaining = list(dict.fromkeys(devices))
    while remaining:
        answered, code = _blkid_batch(remaining, timeout)
        found.update({d: tags for d, tags in answered.items() if d in remaining})
        unanswered = [d for d in remaining if d not in answered]
        if not unanswered:
            break
        first, rest = unanswered[0], unanswered[1:]
        if remaining[: len(answered)] == list(answered) or len(remaining) == 1:
            # blkid stopped at `first`: the exit code is its verdict.
            found[first] = _unidentified(code)
        else:
            # Not the stop-at-first behaviour: ask about `first` alone to be sure.
            alone, alone_code = _blkid_batch([first], timeout)
            found[first] = alone.get(first) or _unidentified(alone_code)
        remaining = rest
    return {device: found.get(device, {}) for device in devices}


def _unidentified(returncode: int) -> dict[str, str]:
    return {PROBE_TAG: PROBE_AMBIVALENT if returncode == BLKID_AMBIVALENT else PROBE_NOTHING}


def filesystem_from_blkid(
    number: int, tags: dict[str, str], *, partuuid: str | None = None, partlabel: str | None = None
) -> Filesystem:
    """Combine blkid tags of a partition device with what the partition table says."""
    content = None
    if not tags.get("TYPE"):
        content = tags.get(CONTENT_TAG) or "no filesystem signature"
    return Filesystem(
        partition=number,
        type=tags.get("TYPE"),
        uuid=tags.get("UUID"),
        label=tags.get("LABEL"),
        partuuid=tags.get("PART_ENTRY_UUID") or partuuid,
        partlabel=tags.get("PART_ENTRY_NAME") or partlabel,
        usage=tags.get("USAGE"),
        content=content,
    )


ZERO_CHECK_BYTES = 1024 * 1024


def describe_unidentified(tags: dict[str, str], type_name: str | None, head: bytes) -> str:
    """Words for a partition blkid could not identify (pure): what the table calls it
    and what its first bytes look like, so a report can say what was found."""
    if tags.get(PROBE_TAG) == PROBE_AMBIVALENT:
        what = "more than one filesystem signature (ambivalent)"
    elif not head:
        what = "unreadable or zero-length"
    elif head.count(0) == len(head):
        what = f"empty (all zeros in the first {len(head) // 1024} KiB)"
    else:
        what = "unrecognised data, no filesystem signature"
    return f"{type_name}: {what}" if type_name else what


def read_head(device: str, size: int = ZERO_CHECK_BYTES) -> bytes:
    """The first bytes of a device; empty when it cannot be read."""
    try:
        with open(device, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


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
