"""The marker of a finished conversion: what lets a resumed VM skip a disk.

A marker `<disk>.vmcraft.json` sits next to the converted disk. It counts only when:

- the tool wrote it (it is in the folder's ledger, see `outfiles`), so a planted marker
  for a planted qcow2 (whose data file may be a host file) is refused;
- the source still has the identity it had when it was converted;
- the converted disk is the very file the tool published (in the ledger too), with the
  identity (device, inode, size, mtime) the marker recorded, and its checksum matches.

The checksum is not a sha256 of the whole disk: that reads 100 GB on every resume. Only
root can change a disk the tool made (it is 0640 at most and root's), and every change
through the file system moves its mtime; the identity catches those. The checksum is a
second witness over what decides what the disk *refers to* and holds, at a bounded cost:
a full sha256 up to `FULL_HASH_MAX_BYTES`; above that, for qcow2, the sha256 of its
header cluster (backing file, data-file and other header extensions), L1 table and
refcount table; for other formats, of evenly spaced samples. A qcow2 whose metadata was
rewritten with its mtime put back is caught; a change of guest data clusters alone with
the mtime restored is not (it needs root and refers to no host file).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmcraft_tasks.craft.images import disk_identity
from vmcraft_tasks.outfiles import (
    DISK,
    FILE_MODE,
    MARKER_SUFFIX,
    FileIdentity,
    MissingFolderError,
    OutputDir,
    OutputError,
    check_file_name,
    output_mode,
)

MARKER_VERSION = 1
FULL_HASH_MAX_BYTES = 256 << 20  # about a second of reading: whole file
SAMPLES = 16
SAMPLE_BYTES = 1 << 20
QCOW2_META_MAX_BYTES = 64 << 20  # L1 or refcount table larger than this: not our qcow2
_QCOW2_MAGIC = b"QFI\xfb"
# magic, version, backing offset/size, cluster_bits, size, crypt, l1_size, l1 offset,
# refcount table offset, refcount table clusters
_QCOW2_HEADER = struct.Struct(">4sIQIIQIIQQI")


class ConversionSourceChangedError(OutputError):
    """The source's identity changed between the start and the end of a conversion."""


@dataclass(frozen=True)
class ConversionMarker:
    """A finished conversion: the source it came from and the output it made."""

    source: str
    source_identity: str  # disk_identity() of the source when it was converted
    target: str
    target_identity: FileIdentity
    checksum: str  # "<scheme>:<hex>"
    conversion: dict[str, Any]  # the conversion result as the job records it

    def to_dict(self) -> dict[str, Any]:
        return {
            "marker_version": MARKER_VERSION,
            "source": self.source,
            "source_identity": self.source_identity,
            "target": self.target,
            "target_identity": self.target_identity.to_dict(),
            "checksum": self.checksum,
            "conversion": self.conversion,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ConversionMarker:
        if not isinstance(data, dict) or data.get("marker_version") != MARKER_VERSION:
            raise ValueError("not a conversion marker of this version")
        conversion = data["conversion"]
        if not isinstance(conversion, dict):
            raise ValueError("conversion is not a mapping")
        return cls(
            source=str(data["source"]),
            source_identity=str(data["source_identity"]),
            target=str(data["target"]),
            target_identity=FileIdentity.from_dict(data["target_identity"]),
            checksum=str(data["checksum"]),
            conversion=conversion,
        )


def marker_name(target: str) -> str:
    """The marker's file name for a converted disk (pure)."""
    return check_file_name(os.path.basename(target)) + MARKER_SUFFIX


# --- checksum -----------------------------------------------------------------------


def output_checksum(fd: int, size: int) -> str:
    """`<scheme>:<sha256 hex>` of an open output (see the module docstring for why)."""
    if size <= FULL_HASH_MAX_BYTES:
        return "sha256:" + _sha256_range(fd, 0, size)
    header = os.pread(fd, _QCOW2_HEADER.size, 0)
    if header[:4] == _QCOW2_MAGIC:
        meta = _qcow2_meta_digest(fd, header, size)
        if meta is not None:
            return "qcow2-meta-sha256:" + meta
    return "sampled-sha256:" + _sampled_digest(fd, size)


def _sha256_range(fd: int, offset: int, length: int, digest: Any = None) -> str:
    digest = digest if digest is not None else hashlib.sha256()
    end = offset + length
    while offset < end:
        block = os.pread(fd, min(1 << 20, end - offset), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    return str(digest.hexdigest())


def _qcow2_meta_digest(fd: int, header: bytes, size: int) -> str | None:
    """sha256 of the header cluster, L1 table and refcount table; None if implausible."""
    if len(header) < _QCOW2_HEADER.size:
        return None
    fields = _QCOW2_HEADER.unpack(header)
    cluster_bits, l1_size, l1_offset = fields[4], fields[7], fields[8]
    refcount_offset, refcount_clusters = fields[9], fields[10]
    if not 9 <= cluster_bits <= 21:
        return None
    cluster = 1 << cluster_bits
    ranges = [
        (0, cluster),
        (l1_offset, l1_size * 8),
        (refcount_offset, refcount_clusters * cluster),
    ]
    if any(n > QCOW2_META_MAX_BYTES or off + n > size for off, n in ranges):
        return None
    digest = hashlib.sha256(b"qcow2-meta\0")
    for offset, length in ranges:
        digest.update(struct.pack(">QQ", offset, length))
        _sha256_range(fd, offset, length, digest)
    return str(digest.hexdigest())


def _sampled_digest(fd: int, size: int) -> str:
    digest = hashlib.sha256(b"sampled\0")
    step = max((size - SAMPLE_BYTES) // (SAMPLES - 1), 1)
    for n in range(SAMPLES):
        offset = min(n * step, max(size - SAMPLE_BYTES, 0))
        digest.update(struct.pack(">Q", offset))
        _sha256_range(fd, offset, SAMPLE_BYTES, digest)
    return str(digest.hexdigest())


def _identity_and_checksum(out: OutputDir, name: str) -> tuple[FileIdentity, str] | None:
    opened = out.open_own(name)
    if opened is None:
        return None
    fd, st = opened
    try:
        return FileIdentity.of(st), output_checksum(fd, st.st_size)
    finally:
        os.close(fd)


# --- reading the marker -------------------------------------------------------------


def already_converted(source: str, target: str, roots: Sequence[str]) -> ConversionMarker | None:
    """The marker of a finished conversion of `source` into `target`, if it still holds.

    None when there is none, or when it no longer holds (the source or the output changed,
    the output is gone, the marker is unreadable): convert again, replacing the tool's own
    files. Raises ForeignFileError when a file the tool did not make sits at the marker's
    name (a planted marker, a symlink) or at the target's: the conversion could not be
    published there anyway, so the VM fails at once, naming the file.
    """
    try:
        out = OutputDir.open(os.path.dirname(target), roots, create=False)
    except MissingFolderError:
        return None  # nothing was ever converted there
    with out:
        name = check_file_name(os.path.basename(target))
        out.require_replaceable(name)
        raw = out.read_own(marker_name(target))
        if raw is None:
            return None
        marker = _parse(raw)
        if marker is None or not _same_conversion(marker, source, target):
            return None
        found = _identity_and_checksum(out, name)
        if found is None or found != (marker.target_identity, marker.checksum):
            return None
        return marker


def _parse(raw: bytes) -> ConversionMarker | None:
    try:
        return ConversionMarker.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def _same_conversion(marker: ConversionMarker, source: str, target: str) -> bool:
    if (marker.source, marker.target) != (source, target):
        return False
    try:
        return marker.source_identity == disk_identity(source)
    except OSError:
        return False


# --- writing it ---------------------------------------------------------------------


def stage_conversion(target: str, roots: Sequence[str]) -> str:
    """Where a converter may write `target`'s new content: an unpredictable, unused path
    next to it in its confined folder (created 0750 if missing).

    Checks first that neither the target nor its marker is a file the tool did not make,
    so a conversion that could never be published fails before it starts.
    """
    with OutputDir.open(os.path.dirname(target), roots) as out:
        name = check_file_name(os.path.basename(target))
        out.require_replaceable(name)
        out.require_replaceable(marker_name(target))
        return out.join(out.staging_name(name))


def publish_conversion(
    source: str,
    staged: str,
    target: str,
    roots: Sequence[str],
    conversion: Mapping[str, Any],
    *,
    source_identity: str,
) -> ConversionMarker:
    """Publish the converted disk at `staged` as `target` and write its marker.

    The disk gets the source's permissions capped at 0640 (`output_mode`), and is
    published only over nothing or over the tool's own file. `source_identity` is the
    source's identity from before the conversion; a source that changed since fails.
    """
    if os.path.dirname(staged) != os.path.dirname(target):
        raise ValueError(f"{staged} is not next to {target}")
    source_stat = os.stat(source)
    if disk_identity(source) != source_identity:
        raise ConversionSourceChangedError(
            f"{source}: changed during its conversion; the copy is not kept", path=source
        )
    with OutputDir.open(os.path.dirname(target), roots, create=False) as out:
        name = os.path.basename(target)
        out.publish(
            os.path.basename(staged), name, mode=output_mode(source_stat.st_mode), kind=DISK
        )
        return _write_marker(out, source, target, source_identity, conversion)


def _write_marker(
    out: OutputDir,
    source: str,
    target: str,
    source_identity: str,
    conversion: Mapping[str, Any],
) -> ConversionMarker:
    found = _identity_and_checksum(out, os.path.basename(target))
    if found is None:
        raise OutputError(f"{target}: vanished right after it was published", path=target)
    identity, checksum = found
    marker = ConversionMarker(
        source=source,
        source_identity=source_identity,
        target=target,
        target_identity=identity,
        checksum=checksum,
        conversion={**conversion, "target": target, "source_identity": source_identity},
    )
    text = json.dumps(marker.to_dict(), indent=2, sort_keys=True) + "\n"
    out.write_text(marker_name(target), text, mode=FILE_MODE, kind="marker")
    return marker


def convert_confined(
    source: str,
    target: str,
    roots: Sequence[str],
    convert: Callable[[str], Mapping[str, Any]],
) -> ConversionMarker:
    """Convert `source` into `target` safely: `convert(staged_path)` writes the new disk
    at a staging path (e.g. `convert_image(source, staged, overwrite=False).to_dict()`),
    which is then published and marked; a failure removes the staged file."""
    source_identity = disk_identity(source)
    staged = stage_conversion(target, roots)
    try:
        conversion = convert(staged)
        return publish_conversion(
            source, staged, target, roots, conversion, source_identity=source_identity
        )
    finally:
        _discard(staged, roots)


def rebind_conversion(source: str, target: str, roots: Sequence[str]) -> ConversionMarker | None:
    """After the tool itself changed its converted disk (the fix step, once detached):
    bind the marker to the disk as it is now, so a resume keeps it. None (marker left
    as it is, so a resume converts again) when there is no marker of this source."""
    with OutputDir.open(os.path.dirname(target), roots, create=False) as out:
        raw = out.read_own(marker_name(target))
        marker = None if raw is None else _parse(raw)
        if marker is None or not _same_conversion(marker, source, target):
            return None
        return _write_marker(out, source, target, marker.source_identity, marker.conversion)


def _discard(staged: str, roots: Sequence[str]) -> None:
    try:
        with OutputDir.open(os.path.dirname(staged), roots, create=False) as out:
            out.discard_staged(os.path.basename(staged))
    except (OSError, OutputError):
        pass  # best effort: the staged name is hidden and unpredictable
