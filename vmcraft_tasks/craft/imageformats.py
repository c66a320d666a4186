"""Pure readers of disk image headers: what each format says it refers to.

Nothing here opens a file or runs a program. Each parser takes bytes, or a `Reader`
(`read(offset, length) -> bytes`, short at the end of the file), and returns what the
header names: backing files, extents, data files, parents, and the numbers needed to
tell a truncated file from a complete one.

Where qemu's own parsing has quirks that decide which files it opens (the VMDK
descriptor is read with `sscanf`, the parent hint with `strstr`), the parsers here
reproduce qemu 7.2's behaviour, so the check sees exactly the files qemu would open.
"""

from __future__ import annotations

import os
import struct
import sys
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass

Reader = Callable[[int, int], bytes]

SUPPORTED_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"})

# How much of a file qemu's format probe looks at, and how much we read to parse.
PROBE_SIZE = 512
SECTOR = 512


class FormatError(ValueError):
    """The header is malformed; the message says what is wrong with it."""


def cstring(data: bytes) -> str:
    """A C string in `data` (up to its first NUL) as a file name (surrogate-escaped)."""
    return os.fsdecode(data.split(b"\0", 1)[0])


def has_protocol(name: str) -> bool:
    """qemu's path_has_protocol(): a ':' before the first '/' makes `name` a protocol
    reference (nbd:, fat:, json:, http:, ...) rather than a file name."""
    for char in name:
        if char == "/":
            return False
        if char == ":":
            return True
    return False


def protocol_of(name: str) -> str:
    return name.split(":", 1)[0]


# --------------------------------------------------------------------------- detection

QCOW_MAGIC = b"QFI\xfb"
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
VHDX_MAGIC = b"vhdxfile"
VPC_MAGIC = b"conectix"
VDI_SIGNATURE = 0xBEDA107F

# Formats qemu would recognise that we do not convert: named so the refusal says what
# the file is instead of treating it as a raw disk.
_OTHER_MAGICS = (
    (b"QED\0", "qed"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)


def _vmdk_text_probe(head: bytes) -> bool:
    """qemu's vmdk_probe() for a text descriptor: comments and blank lines, then
    `version=N` on its own line."""
    p, end = 0, len(head)
    while p < end:
        if head[p : p + 1] == b"#":
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if head[p : p + 1] == b" ":
            while p < end and head[p : p + 1] == b" ":
                p += 1
            if p < end and head[p : p + 1] == b"\r":
                p += 1
            if p == end or head[p : p + 1] != b"\n":
                return False
            p += 1
            continue
        rest = head[p:]
        return any(
            rest.startswith(f"version={n}{eol}".encode())
            for n in (1, 2, 3)
            for eol in ("\n", "\r\n")
        )
    return False


def detect_format(head: bytes) -> str:
    """The format of a file from its first bytes, the way qemu's probe decides (pure).

    A fixed VHD has its footer only at the end; qemu's probe, and this one, call it
    raw: only a `.vhd` name (see images.FORMAT_HINTS) makes it `vpc`.
    """
    if head[:4] == QCOW_MAGIC and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        return "qcow2" if version >= 2 else "qcow"
    if head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
        return "vmdk"
    if head[:8] == VHDX_MAGIC:
        return "vhdx"
    if head[:8] == VPC_MAGIC:
        return "vpc"
    if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == VDI_SIGNATURE:
        return "vdi"
    for magic, name in _OTHER_MAGICS:
        if head.startswith(magic):
            return name
    if _vmdk_text_probe(head[:PROBE_SIZE]):
        return "vmdk"
    return "raw"


# --------------------------------------------------------------------------- qcow2

QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_KNOWN = (
    QCOW2_INCOMPAT_DIRTY
    | QCOW2_INCOMPAT_CORRUPT
    | QCOW2_INCOMPAT_DATA_FILE
    | QCOW2_INCOMPAT_COMPRESSION
    | QCOW2_INCOMPAT_EXTL2
)
QCOW2_EXT_END = 0x00000000
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_MAX_BACKING_NAME = 1023
QCOW2_MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8  # qemu's QCOW_MAX_L1_SIZE
QCOW2_MAX_CLUSTER_BITS = 21
_QCOW2_V2_HEADER = ">4sIQIIQIIQQIIQ"
_QCOW2_V3_FIELDS = ">QQQII"
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    incompatible_features: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)


def _padded(buf: bytes, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, zero-filled past the end (qemu reads past EOF as 0)."""
    chunk = buf[offset : offset + length]
    return chunk + bytes(length - len(chunk))


def _qcow2_extensions(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """Header extensions between `start` and `end`, as qemu's qcow2_read_extensions()
    walks them; a name extension given twice is refused (which one would qemu use?)."""
    found: dict[int, bytes] = {}
    offset = start
    while offset < end:
        if end - offset < 8:
            raise FormatError("qcow2 header extension is cut short")
        kind, length = struct.unpack(">II", _padded(buf, offset, 8))
        offset += 8
        if kind == QCOW2_EXT_END:
            break
        if length > end - offset:
            raise FormatError(f"qcow2 header extension 0x{kind:08x} is larger than the header")
        if kind in found and kind in (QCOW2_EXT_BACKING_FORMAT, QCOW2_EXT_DATA_FILE):
            raise FormatError(f"qcow2 header extension 0x{kind:08x} appears twice")
        found[kind] = _padded(buf, offset, length)
        offset += (length + 7) & ~7
    return found


def parse_qcow2_header(buf: bytes) -> Qcow2Header:
    """Parse a qcow2 header from the first cluster of the file (pure).

    `buf` should hold the whole first cluster (up to 2 MiB): the extensions and the
    backing file name live there.
    """
    if len(buf) < 72 or buf[:4] != QCOW_MAGIC:
        raise FormatError("not a qcow2 header")
    fields = struct.unpack_from(_QCOW2_V2_HEADER, buf, 0)
    _, version, backing_offset, backing_size, cluster_bits, size, crypt = fields[:7]
    l1_size, l1_offset = fields[7], fields[8]
    if version not in (2, 3):
        raise FormatError(f"qcow2 version {version} is not supported")
    if not 9 <= cluster_bits <= QCOW2_MAX_CLUSTER_BITS:
        raise FormatError(f"invalid qcow2 cluster size 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompatible, header_length = 0, 72
    if version == 3:
        if len(buf) < 104:
            raise FormatError("qcow2 v3 header is cut short")
        incompatible, _compat, _autoclear, _order, header_length = struct.unpack_from(
            _QCOW2_V3_FIELDS, buf, 72
        )
        if header_length < 104 or header_length > cluster_size:
            raise FormatError(f"invalid qcow2 header length {header_length}")
    unknown = incompatible & ~QCOW2_INCOMPAT_KNOWN
    if unknown:
        raise FormatError(f"unknown qcow2 incompatible features 0x{unknown:x}")
    ext_end = backing_offset if backing_offset else cluster_size
    extensions = _qcow2_extensions(buf, header_length, ext_end)
    backing_format = None
    if QCOW2_EXT_BACKING_FORMAT in extensions:
        raw_format = extensions[QCOW2_EXT_BACKING_FORMAT]
        if len(raw_format) >= 16:
            raise FormatError("qcow2 backing format name is too long")
        backing_format = cstring(raw_format) or None
    data_file = None
    if QCOW2_EXT_DATA_FILE in extensions:
        data_file = cstring(extensions[QCOW2_EXT_DATA_FILE]) or None
    if data_file and not incompatible & QCOW2_INCOMPAT_DATA_FILE:
        raise FormatError("qcow2 names a data file without the external-data-file feature")
    backing = None
    if backing_offset:
        if backing_size > min(
            QCOW2_MAX_BACKING_NAME, cluster_size - min(backing_offset, cluster_size)
        ):
            raise FormatError("qcow2 backing file name is too long")
        backing = cstring(_padded(buf, backing_offset, backing_size)) or None
    return Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        virtual_size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        incompatible_features=incompatible,
        backing_file=backing,
        backing_format=backing_format,
        data_file=data_file,
    )


def _be64_entries(buf: bytes, stride: int) -> array[int]:
    """Big-endian u64 entries of a table, every `stride`-th (2: extended L2 entries)."""
    usable = len(buf) - len(buf) % 8
    entries = array("Q", buf[:usable])
    if sys.byteorder == "little":
        entries.byteswap()
    return entries[::stride] if stride > 1 else entries


@dataclass(frozen=True)
class DataEnd:
    """The highest byte a format's tables point at, per file (0: none)."""

    image: int = 0
    data_file: int = 0
    # How far past the end of its file a last cluster may reach without being
    # corruption (qemu-img check tolerates less than one cluster).
    slack: int = 0


def _largest_offset(table: bytes, stride: int) -> int:
    """The largest host offset in a table of big-endian u64 entries without the
    compressed flag: flags cleared bytewise, the maximum taken in C (tables of a
    large image hold millions of entries)."""
    scrubbed = bytearray(table)
    scrubbed[0::8] = bytes(len(range(0, len(scrubbed), 8)))  # bits 56-63: flags
    return max(_be64_entries(bytes(scrubbed), stride), default=0) & ~0x1FF


def _qcow2_l2_end(header: Qcow2Header, table: bytes) -> tuple[int, int]:
    """(image end, data file end) referenced by one L2 table."""
    stride = 2 if header.extended_l2 else 1
    cluster = header.cluster_size
    top_bytes = set(table[0 :: 8 * stride])
    if not any(b & 0x40 for b in top_bytes):  # no compressed cluster in this table
        top = _largest_offset(table, stride)
        if not top:
            return 0, 0
        return (0, top + cluster) if header.has_data_file else (top + cluster, 0)
    image_end = data_end = 0
    bits = 62 - (header.cluster_bits - 8)
    for entry in _be64_entries(table, stride):
        if entry & QCOW_OFLAG_COMPRESSED:
            offset = entry & ((1 << bits) - 1)
            sectors = ((entry >> bits) & ((1 << (header.cluster_bits - 8)) - 1)) + 1
            image_end = max(image_end, (offset & ~(SECTOR - 1)) + sectors * SECTOR)
        elif entry & L2E_OFFSET_MASK:
            end = (entry & L2E_OFFSET_MASK) + cluster
            if header.has_data_file:
                data_end = max(data_end, end)
            else:
                image_end = max(image_end, end)
    return image_end, data_end


def qcow2_data_end(header: Qcow2Header, read: Reader) -> DataEnd:
    """The end of everything the active L1/L2 tables point at (pure over `read`).

    A file shorter than this was truncated: qemu would read the missing clusters as
    zeros and a conversion would silently produce a damaged disk.
    """
    if header.l1_size > QCOW2_MAX_L1_ENTRIES:
        raise FormatError(f"qcow2 L1 table of {header.l1_size} entries is too large")
    cluster = header.cluster_size
    l1 = read(header.l1_table_offset, header.l1_size * 8)
    image_end = header.l1_table_offset + header.l1_size * 8 if header.l1_size else 0
    data_end = 0
    for entry in _be64_entries(l1, 1):
        l2_offset = entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        image_end = max(image_end, l2_offset + cluster)
        table = read(l2_offset, cluster)
        if len(table) < cluster:
            break  # the table itself is past the end: image_end already says so
        image, data = _qcow2_l2_end(header, table)
        image_end, data_end = max(image_end, image), max(data_end, data)
    return DataEnd(image=image_end, data_file=data_end, slack=cluster)


# --------------------------------------------------------------------------- VMDK

VMDK_DESC_SIZE = 20 * SECTOR  # how much qemu's vmdk_parent_open() reads
VMDK_MAX_DESC = (1 << 20) - 1  # how much vmdk_read_desc() reads
VMDK_SPARSE_DESC_OFFSET = 0x200  # where qemu looks for the parent of a sparse file
VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
VMDK4_FLAG_ZERO_GRAIN = 1 << 2
VMDK4_COMPRESSION_DEFLATE = 1
VMDK_EXTENT_TYPES = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})
VMDK_FLAT_TYPES = frozenset({"FLAT", "VMFS"})
_VMDK4_HEADER = "<4sIIQQQQIQQQ"
_C_SPACE = " \t\n\v\f\r"
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)


@dataclass(frozen=True)
class VmdkSparseHeader:
    """The header of a hosted sparse extent (magic KDMV)."""

    version: int
    flags: int
    capacity: int  # sectors
    granularity: int  # sectors per grain
    desc_offset: int  # sectors
    desc_size: int  # sectors
    num_gtes_per_gt: int
    gd_offset: int  # sectors
    grain_offset: int  # sectors
    compress_algorithm: int

    @property
    def holds_descriptor(self) -> bool:
        """qemu reads a sparse file of capacity 0 as a descriptor file in disguise."""
        return self.capacity == 0 and self.desc_offset != 0

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == VMDK4_COMPRESSION_DEFLATE


def parse_vmdk_sparse_header(buf: bytes) -> VmdkSparseHeader:
    if len(buf) < 79 or buf[:4] != VMDK4_MAGIC:
        raise FormatError("not a VMDK sparse extent header")
    fields = struct.unpack_from(_VMDK4_HEADER, buf, 0)
    compress = struct.unpack_from("<H", buf, 77)[0]
    return VmdkSparseHeader(
        version=fields[1],
        flags=fields[2],
        capacity=fields[3],
        granularity=fields[4],
        desc_offset=fields[5],
        desc_size=fields[6],
        num_gtes_per_gt=fields[7],
        gd_offset=fields[9],
        grain_offset=fields[10],
        compress_algorithm=compress,
    )


@dataclass(frozen=True)
class VmdkExtentLine:
    access: str
    sectors: int
    type: str
    filename: str
    offset: int  # sectors into a FLAT/VMFS extent file


@dataclass(frozen=True)
class VmdkDescriptor:
    extents: tuple[VmdkExtentLine, ...]  # what qemu opens, in qemu's order
    # Every quoted name on an extent-like line, including those qemu skips (RDONLY,
    # NOACCESS, unknown types): checked too, so a mistake here cannot hide a file.
    mentioned: tuple[str, ...]


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    return i


def _scan_token(text: str, i: int, width: int) -> tuple[str, int]:
    """`%<width>s`: leading whitespace skipped, then up to `width` non-space chars."""
    i = _skip_space(text, i)
    j = i
    while j < len(text) and j - i < width and text[j] not in _C_SPACE:
        j += 1
    return text[i:j], j


def _scan_int(text: str, i: int) -> tuple[int | None, int]:
    """`%ld`: leading whitespace, an optional sign, decimal digits (clamped like strtol)."""
    i = _skip_space(text, i)
    j = i
    if j < len(text) and text[j] in "+-":
        j += 1
    k = j
    while k < len(text) and text[k].isascii() and text[k].isdigit():
        k += 1
    if k == j:
        return None, i
    value = int(text[i:k])
    return min(max(value, _INT64_MIN), _INT64_MAX), k


@dataclass(frozen=True)
class _Scanned:
    matches: int
    access: str = ""
    sectors: int = 0
    type: str = ""
    filename: str = ""
    offset: int = -1


def _scan_extent_line(text: str, start: int) -> _Scanned:
    """qemu's `sscanf(p, "%10s %ld %10s \\"%511[^\\n\\r\\"]\\" %ld", ...)` from `start`.

    Like sscanf, whitespace (newlines included) is skipped between fields, so one
    "line" may run over several lines of the file.
    """
    access, i = _scan_token(text, start, 10)
    if not access:
        return _Scanned(0)
    sectors, i = _scan_int(text, i)
    if sectors is None:
        return _Scanned(1, access)
    kind, i = _scan_token(text, i, 10)
    if not kind:
        return _Scanned(2, access, sectors)
    i = _skip_space(text, i)
    if i >= len(text) or text[i] != '"':
        return _Scanned(3, access, sectors, kind)
    j = i + 1
    while j < len(text) and j - (i + 1) < 511 and text[j] not in '\n\r"':
        j += 1
    name = text[i + 1 : j]
    if not name:
        return _Scanned(3, access, sectors, kind)
    if j >= len(text) or text[j] != '"':
        return _Scanned(4, access, sectors, kind, name)
    offset, _ = _scan_int(text, j + 1)
    if offset is None:
        return _Scanned(4, access, sectors, kind, name)
    return _Scanned(5, access, sectors, kind, name, offset)


def _line_starts(text: str) -> list[int]:
    starts, p = [], 0
    while p < len(text):
        starts.append(p)
        nl = text.find("\n", p)
        if nl < 0:
            break
        p = nl + 1
    return starts


def descriptor_text(buf: bytes) -> str:
    """The descriptor as qemu sees it: a C string, one char per byte."""
    return buf.split(b"\0", 1)[0].decode("latin-1")


def _accepted_extent(found: _Scanned, text: str, start: int) -> VmdkExtentLine | None:
    """qemu 7.2's vmdk_parse_extents() decision for one scanned line; raises on the
    lines qemu calls invalid."""
    if found.matches < 4 or found.access != "RW":
        return None
    offset = found.offset
    if found.type == "FLAT":
        if found.matches != 5 or offset < 0:
            raise FormatError(f"invalid VMDK extent line: {_line_at(text, start)}")
    elif found.type == "VMFS":
        if found.matches != 4:
            raise FormatError(f"invalid VMDK extent line: {_line_at(text, start)}")
        offset = 0
    elif found.matches != 4:
        raise FormatError(f"invalid VMDK extent line: {_line_at(text, start)}")
    if found.sectors <= 0 or found.type not in VMDK_EXTENT_TYPES:
        return None
    return VmdkExtentLine(
        "RW", found.sectors, found.type, _filename(found.filename), max(offset, 0)
    )


def _filename(latin: str) -> str:
    return os.fsdecode(latin.encode("latin-1"))


def _line_at(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)].strip()


def parse_vmdk_descriptor(text: str) -> VmdkDescriptor:
    """The extents of a VMDK text descriptor, exactly as qemu 7.2 reads them (pure).

    qemu runs its sscanf at the start of every line; because sscanf skips newlines,
    a blank line before an extent line yields that extent twice, and qemu opens it
    twice: so do we, so `extents.N` options line up with qemu's numbering.
    """
    extents: list[VmdkExtentLine] = []
    mentioned: list[str] = []
    for start in _line_starts(text):
        found = _scan_extent_line(text, start)
        if found.matches >= 4:
            mentioned.append(_filename(found.filename))
        extent = _accepted_extent(found, text, start)
        if extent is not None:
            extents.append(extent)
    return VmdkDescriptor(tuple(extents), tuple(dict.fromkeys(mentioned)))


def vmdk_parent_hint(window: bytes) -> str | None:
    """qemu's vmdk_parent_open(): the first "parentFileNameHint" anywhere in the first
    DESC_SIZE bytes (comments included), 20 characters on, up to the next quote."""
    text = window[:VMDK_DESC_SIZE].split(b"\0", 1)[0]
    at = text.find(b"parentFileNameHint")
    if at < 0:
        return None
    start = at + len("parentFileNameHint") + 2
    end = text.find(b'"', start) if start <= len(text) else -1
    if end < 0:
        raise FormatError("malformed parentFileNameHint in the VMDK descriptor")
    if end - start > 4095:
        raise FormatError("VMDK parentFileNameHint is too long")
    return os.fsdecode(text[start:end]) or None


def vmdk_sparse_data_end(header: VmdkSparseHeader, read: Reader) -> DataEnd:
    """The end of the grains a hosted sparse extent's tables point at (pure over `read`).

    Stream-optimized files keep their tables at the end (qemu checks their footer
    itself); compressed grains have no fixed size, so only their start is checked.
    """
    if header.gd_offset == VMDK_GD_AT_END or header.holds_descriptor:
        return DataEnd()
    per_table = header.num_gtes_per_gt
    grain = header.granularity * SECTOR
    span = per_table * header.granularity
    if not per_table or not span or per_table > 512:
        return DataEnd()  # qemu refuses these headers with its own message
    directory_entries = -(-header.capacity // span)
    if directory_entries > 32 * 1024 * 1024:
        raise FormatError("VMDK grain directory is too large")
    directory = array("I", read(header.gd_offset * SECTOR, directory_entries * 4))
    if sys.byteorder == "big":
        directory.byteswap()
    end = header.gd_offset * SECTOR + directory_entries * 4
    zero_grain = 1 if header.flags & VMDK4_FLAG_ZERO_GRAIN else 0
    for table_sector in directory:
        if not table_sector:
            continue
        end = max(end, table_sector * SECTOR + per_table * 4)
        raw = read(table_sector * SECTOR, per_table * 4)
        if len(raw) < per_table * 4:
            break
        table = array("I", raw)
        if sys.byteorder == "big":
            table.byteswap()
        top = max(table, default=0)
        if top > zero_grain:
            end = max(end, top * SECTOR + (SECTOR if header.compressed else grain))
    return DataEnd(image=end, slack=grain)


# --------------------------------------------------------------------------- VHD (vpc)

VPC_FIXED, VPC_DYNAMIC, VPC_DIFFERENCING = 2, 3, 4


@dataclass(frozen=True)
class VpcFooter:
    disk_type: int
    current_size: int


def parse_vpc_footer(buf: bytes) -> VpcFooter:
    if len(buf) < 64 or buf[:8] != VPC_MAGIC:
        raise FormatError("no VHD footer")
    current_size = struct.unpack_from(">Q", buf, 48)[0]
    disk_type = struct.unpack_from(">I", buf, 60)[0]
    return VpcFooter(disk_type=disk_type, current_size=current_size)


# --------------------------------------------------------------------------- VHDX

VHDX_REGION_TABLES = (192 * 1024, 256 * 1024)
VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_VIRTUAL_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VHDX_HAS_PARENT = 1 << 1
_VHDX_MAX_ENTRIES = 2047


@dataclass(frozen=True)
class VhdxInfo:
    has_parent: bool
    virtual_size: int | None


def _vhdx_metadata_offset(read: Reader) -> int | None:
    for table_at in VHDX_REGION_TABLES:
        head = read(table_at, 16)
        if len(head) < 16 or head[:4] != b"regi":
            continue
        count = min(struct.unpack_from("<I", head, 8)[0], _VHDX_MAX_ENTRIES)
        entries = read(table_at + 16, count * 32)
        for i in range(len(entries) // 32):
            guid = uuid.UUID(bytes_le=entries[i * 32 : i * 32 + 16])
            if guid == VHDX_METADATA_REGION:
                return int(struct.unpack_from("<Q", entries, i * 32 + 16)[0])
    return None


def parse_vhdx(read: Reader) -> VhdxInfo:
    """Whether a VHDX is a differencing disk (has a parent), from its metadata (pure
    over `read`). qemu refuses to open differencing VHDX files itself; this only lets
    the refusal say why."""
    region = _vhdx_metadata_offset(read)
    if region is None:
        raise FormatError("no VHDX metadata region")
    head = read(region, 32)
    if len(head) < 32 or head[:8] != b"metadata":
        raise FormatError("invalid VHDX metadata table")
    count = min(struct.unpack_from("<H", head, 10)[0], _VHDX_MAX_ENTRIES)
    entries = read(region + 32, count * 32)
    has_parent, size = False, None
    for i in range(len(entries) // 32):
        guid = uuid.UUID(bytes_le=entries[i * 32 : i * 32 + 16])
        item_offset = struct.unpack_from("<I", entries, i * 32 + 16)[0]
        if guid == VHDX_PARENT_LOCATOR:
            has_parent = True
        elif guid == VHDX_FILE_PARAMETERS:
            params = read(region + item_offset, 8)
            if len(params) == 8 and struct.unpack_from("<I", params, 4)[0] & VHDX_HAS_PARENT:
                has_parent = True
        elif guid == VHDX_VIRTUAL_SIZE:
            raw = read(region + item_offset, 8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
    return VhdxInfo(has_parent=has_parent, virtual_size=size)


# --------------------------------------------------------------------------- VDI

VDI_TYPE_DYNAMIC, VDI_TYPE_STATIC = 1, 2
VDI_UNALLOCATED = 0xFFFFFFFF
VDI_DISCARDED = 0xFFFFFFFE
_VDI_TYPES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}


@dataclass(frozen=True)
class VdiHeader:
    image_type: int
    offset_bmap: int
    offset_data: int
    disk_size: int
    block_size: int
    blocks_in_image: int

    @property
    def type_name(self) -> str:
        return _VDI_TYPES.get(self.image_type, f"type {self.image_type}")


def parse_vdi_header(buf: bytes) -> VdiHeader:
    if len(buf) < 0x1C8 or struct.unpack_from("<I", buf, 0x40)[0] != VDI_SIGNATURE:
        raise FormatError("not a VDI header")
    image_type = struct.unpack_from("<I", buf, 0x4C)[0]
    offset_bmap, offset_data = struct.unpack_from("<II", buf, 0x154)
    disk_size = struct.unpack_from("<Q", buf, 0x170)[0]
    block_size, _extra, blocks = struct.unpack_from("<III", buf, 0x178)
    return VdiHeader(image_type, offset_bmap, offset_data, disk_size, block_size, blocks)


def vdi_data_end(header: VdiHeader, read: Reader) -> DataEnd:
    """The end of the last allocated block (pure over `read`)."""
    if header.blocks_in_image > 32 * 1024 * 1024:
        raise FormatError("VDI block map is too large")
    bmap = array("I", read(header.offset_bmap, header.blocks_in_image * 4))
    if sys.byteorder == "big":
        bmap.byteswap()
    used = [entry for entry in bmap if entry < VDI_DISCARDED]
    if not used:
        return DataEnd()
    return DataEnd(image=header.offset_data + (max(used) + 1) * header.block_size)
