"""The pure header parsers, on hand-made headers (no qemu, no files)."""

from __future__ import annotations

import struct
import uuid

import pytest

from vmcraft_tasks.craft import imageformats as fmts
from vmcraft_tasks.craft.imageformats import FormatError

# --------------------------------------------------------------------------- builders


def qcow2_header(
    *,
    version: int = 3,
    cluster_bits: int = 16,
    size: int = 1 << 30,
    backing: bytes | None = None,
    backing_format: bytes | None = None,
    data_file: bytes | None = None,
    incompatible: int = 0,
    crypt: int = 0,
    l1_size: int = 0,
    l1_offset: int = 0,
    extra_extensions: list[tuple[int, bytes]] | None = None,
) -> bytes:
    """A qcow2 first cluster as qemu lays it out: header, extensions, backing name."""
    cluster = 1 << cluster_bits
    header_length = 104 if version == 3 else 72
    exts: list[tuple[int, bytes]] = list(extra_extensions or [])
    if backing_format is not None:
        exts.append((fmts.QCOW2_EXT_BACKING_FORMAT, backing_format))
    if data_file is not None:
        exts.append((fmts.QCOW2_EXT_DATA_FILE, data_file))
    ext_bytes = b""
    for kind, data in exts:
        ext_bytes += struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)
    ext_bytes += struct.pack(">II", 0, 0)
    backing_offset = header_length + len(ext_bytes) if backing else 0
    head = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        backing_offset,
        len(backing or b""),
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_offset,
        0,
        0,
        0,
        0,
    )
    if version == 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
    buf = bytearray(cluster)
    buf[: len(head)] = head
    buf[header_length : header_length + len(ext_bytes)] = ext_bytes
    if backing:
        buf[backing_offset : backing_offset + len(backing)] = backing
    return bytes(buf)


def vmdk_sparse_header(
    *,
    capacity: int = 2048,
    granularity: int = 128,
    desc_offset: int = 1,
    desc_size: int = 20,
    gtes: int = 512,
    gd_offset: int = 21,
    grain_offset: int = 128,
    flags: int = 3,
    compress: int = 0,
) -> bytes:
    head = struct.pack(
        "<4sIIQQQQIQQQ",
        b"KDMV",
        1,
        flags,
        capacity,
        granularity,
        desc_offset,
        desc_size,
        gtes,
        0,
        gd_offset,
        grain_offset,
    )
    head += b"\0" + b"\n \r\n" + struct.pack("<H", compress)
    return head + bytes(512 - len(head))


def vdi_header(*, image_type: int = 1, blocks: int = 4, block_size: int = 1 << 20) -> bytes:
    buf = bytearray(512)
    buf[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    struct.pack_into("<IIII", buf, 0x40, fmts.VDI_SIGNATURE, 0x00010001, 0x190, image_type)
    struct.pack_into("<II", buf, 0x154, 512, 1024)
    struct.pack_into("<Q", buf, 0x170, blocks * block_size)
    struct.pack_into("<III", buf, 0x178, block_size, 0, blocks)
    return bytes(buf)


def vpc_footer(disk_type: int, size: int = 1 << 30) -> bytes:
    buf = bytearray(512)
    buf[:8] = b"conectix"
    struct.pack_into(">Q", buf, 48, size)
    struct.pack_into(">I", buf, 60, disk_type)
    return bytes(buf)


def reader(buf: bytes):
    return lambda offset, length: buf[offset : offset + length]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (qcow2_header()[:512], "qcow2"),
        (b"QFI\xfb\0\0\0\x01" + bytes(504), "qcow"),
        (vmdk_sparse_header(), "vmdk"),
        (b"COWD" + bytes(508), "vmdk"),
        (b"# Disk DescriptorFile\nversion=1\nCID=1\n", "vmdk"),
        (b"  \nversion=2\r\n", "vmdk"),
        (b"\nversion=1\n", "raw"),  # qemu accepts only space-filled blank lines
        (b"vhdxfile" + bytes(504), "vhdx"),
        (vpc_footer(3), "vpc"),
        (vdi_header(), "vdi"),
        (b"QED\0" + bytes(60), "qed"),
        (b"LUKS\xba\xbe" + bytes(60), "luks"),
        (b"meeting notes\nversion=1\n", "raw"),
        (bytes(512), "raw"),
    ],
)
def test_detect_format_like_qemus_probe(head, expected):
    assert fmts.detect_format(head) == expected


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("nbd://127.0.0.1:10809", True),
        ("nbd:127.0.0.1:10809", True),
        ("fat:16:/srv/dir", True),
        ('json:{"driver":"file"}', True),
        ("http://example.com/disk", True),
        ("ssh://host/disk", True),
        ("file:/etc/shadow", True),
        ("relative:name", True),
        ("/abs/with:colon", False),
        ("sub/dir:x", False),
        ("plain.qcow2", False),
        ("../up.raw", False),
    ],
)
def test_has_protocol_is_qemus_rule(name, protocol):
    assert fmts.has_protocol(name) is protocol


# --------------------------------------------------------------------------- qcow2


def test_qcow2_backing_file_and_format():
    header = fmts.parse_qcow2_header(qcow2_header(backing=b"/etc/shadow", backing_format=b"raw"))
    assert header.backing_file == "/etc/shadow"
    assert header.backing_format == "raw"
    assert header.data_file is None
    assert header.virtual_size == 1 << 30


def test_qcow2_v2_header_has_no_extensions_area_quirks():
    header = fmts.parse_qcow2_header(qcow2_header(version=2, backing=b"base.qcow2"))
    assert header.version == 2
    assert header.backing_file == "base.qcow2"
    assert header.backing_format is None


def test_qcow2_backing_name_is_a_c_string():
    header = fmts.parse_qcow2_header(qcow2_header(backing=b"base.raw\0/etc/shadow"))
    assert header.backing_file == "base.raw"


def test_qcow2_without_backing():
    header = fmts.parse_qcow2_header(qcow2_header())
    assert header.backing_file is None


def test_qcow2_data_file_needs_the_incompatible_bit():
    header = fmts.parse_qcow2_header(
        qcow2_header(data_file=b"/etc/shadow", incompatible=fmts.QCOW2_INCOMPAT_DATA_FILE)
    )
    assert header.has_data_file
    assert header.data_file == "/etc/shadow"
    with pytest.raises(FormatError, match="without the external-data-file feature"):
        fmts.parse_qcow2_header(qcow2_header(data_file=b"/etc/shadow"))


def test_qcow2_data_file_bit_without_a_name_is_reported():
    header = fmts.parse_qcow2_header(qcow2_header(incompatible=fmts.QCOW2_INCOMPAT_DATA_FILE))
    assert header.has_data_file and header.data_file is None


def test_qcow2_duplicate_name_extension_is_refused():
    ext = (fmts.QCOW2_EXT_DATA_FILE, b"a.raw")
    with pytest.raises(FormatError, match="appears twice"):
        fmts.parse_qcow2_header(
            qcow2_header(
                data_file=b"b.raw",
                incompatible=fmts.QCOW2_INCOMPAT_DATA_FILE,
                extra_extensions=[ext],
            )
        )


def test_qcow2_unknown_incompatible_feature_is_refused():
    with pytest.raises(FormatError, match="unknown qcow2 incompatible features"):
        fmts.parse_qcow2_header(qcow2_header(incompatible=1 << 40))


def test_qcow2_overlong_backing_name_is_refused():
    with pytest.raises(FormatError, match="too long"):
        fmts.parse_qcow2_header(qcow2_header(backing=b"a" * 1024))


def test_qcow2_extension_larger_than_the_header_is_refused():
    buf = bytearray(qcow2_header())
    struct.pack_into(">II", buf, 104, 0x12345678, 1 << 20)
    with pytest.raises(FormatError, match="larger than the header"):
        fmts.parse_qcow2_header(bytes(buf))


def test_qcow2_version_1_and_bad_cluster_bits_are_refused():
    with pytest.raises(FormatError, match="version 1"):
        fmts.parse_qcow2_header(qcow2_header(version=2)[:4] + b"\0\0\0\x01" + bytes(200))
    with pytest.raises(FormatError, match="cluster size"):
        fmts.parse_qcow2_header(qcow2_header(cluster_bits=30)[:72] + bytes(40))


def test_qcow2_encryption_is_visible():
    assert fmts.parse_qcow2_header(qcow2_header(crypt=2)).crypt_method == 2


def _qcow2_with_tables(l2_entries: list[int], *, incompatible: int = 0) -> bytes:
    """A 64 KiB-cluster image: header in cluster 0, L1 in cluster 1, one L2 in cluster 2."""
    cluster = 1 << 16
    buf = bytearray(
        qcow2_header(incompatible=incompatible, l1_size=1, l1_offset=cluster, size=1 << 29)
    )
    buf += bytearray(2 * cluster)
    struct.pack_into(">Q", buf, cluster, (2 * cluster) | fmts.QCOW_OFLAG_COPIED)
    for i, entry in enumerate(l2_entries):
        struct.pack_into(">Q", buf, 2 * cluster + i * 8, entry)
    return bytes(buf)


def test_qcow2_data_end_is_the_last_referenced_cluster():
    cluster = 1 << 16
    buf = _qcow2_with_tables([(3 * cluster) | fmts.QCOW_OFLAG_COPIED, 9 * cluster])
    header = fmts.parse_qcow2_header(buf)
    end = fmts.qcow2_data_end(header, reader(buf))
    assert end.image == 10 * cluster
    assert end.data_file == 0
    assert end.slack == cluster


def test_qcow2_data_end_of_compressed_clusters():
    cluster_bits = 16
    bits = 62 - (cluster_bits - 8)
    offset, sectors = 5 * (1 << 16) + 100, 3
    entry = fmts.QCOW_OFLAG_COMPRESSED | ((sectors - 1) << bits) | offset
    buf = _qcow2_with_tables([entry])
    end = fmts.qcow2_data_end(fmts.parse_qcow2_header(buf), reader(buf))
    assert end.image == (offset & ~511) + sectors * 512


def test_qcow2_data_end_counts_an_external_data_file_separately():
    cluster = 1 << 16
    buf = _qcow2_with_tables(
        [(7 * cluster) | fmts.QCOW_OFLAG_COPIED], incompatible=fmts.QCOW2_INCOMPAT_DATA_FILE
    )
    end = fmts.qcow2_data_end(fmts.parse_qcow2_header(buf), reader(buf))
    assert end.data_file == 8 * cluster
    assert end.image == 3 * cluster  # the L2 table itself


def test_qcow2_data_end_of_a_table_beyond_the_file():
    cluster = 1 << 16
    buf = bytearray(qcow2_header(l1_size=1, l1_offset=cluster)) + bytearray(cluster)
    struct.pack_into(">Q", buf, cluster, 40 * cluster)
    end = fmts.qcow2_data_end(fmts.parse_qcow2_header(bytes(buf)), reader(bytes(buf)))
    assert end.image == 41 * cluster


def test_qcow2_huge_l1_is_refused():
    header = fmts.parse_qcow2_header(qcow2_header(l1_size=1 << 30, l1_offset=1 << 16))
    with pytest.raises(FormatError, match="L1 table"):
        fmts.qcow2_data_end(header, reader(b""))


# --------------------------------------------------------------------------- VMDK descriptor

DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="{kind}"

# Extent description
{extents}

# The Disk Data Base
#DDB
ddb.adapterType = "ide"
"""


def descriptor(extents: str, kind: str = "monolithicFlat") -> str:
    return DESCRIPTOR.format(kind=kind, extents=extents)


def test_vmdk_descriptor_extents():
    text = descriptor(
        'RW 2048 FLAT "a-flat.vmdk" 0\nRW 4096 SPARSE "a-s002.vmdk"\nRW 10 VMFS "b.vmdk"'
    )
    parsed = fmts.parse_vmdk_descriptor(text)
    assert [(e.type, e.sectors, e.filename, e.offset) for e in parsed.extents] == [
        ("FLAT", 2048, "a-flat.vmdk", 0),
        ("SPARSE", 4096, "a-s002.vmdk", 0),
        ("VMFS", 10, "b.vmdk", 0),
    ]


def test_vmdk_blank_line_before_an_extent_yields_it_twice_as_in_qemu():
    # qemu's sscanf skips the newline of the blank line and reads the next line twice.
    text = descriptor('\nRW 100 FLAT "x.bin" 0')
    assert [e.filename for e in fmts.parse_vmdk_descriptor(text).extents] == ["x.bin", "x.bin"]


def test_vmdk_extent_spread_over_lines_is_one_extent():
    text = 'createType="monolithicFlat"\nRW\n 1 FLAT\n "/etc/hostname" 0\n'
    parsed = fmts.parse_vmdk_descriptor(text)
    assert [e.filename for e in parsed.extents] == ["/etc/hostname"]


@pytest.mark.parametrize(
    "line",
    [
        'RDONLY 100 FLAT "/etc/shadow" 0',
        'NOACCESS 100 FLAT "/etc/shadow" 0',
        'rw 100 FLAT "/etc/shadow" 0',
        'RW 0 FLAT "/etc/shadow" 0',
        'RW -5 FLAT "/etc/shadow" 0',
        'RW 100 ZERO "/etc/shadow"',
        'RW 100 VMFSRDM "/etc/shadow"',
    ],
)
def test_vmdk_lines_qemu_skips_are_mentioned_not_opened(line):
    parsed = fmts.parse_vmdk_descriptor(descriptor(line))
    assert parsed.extents == ()
    assert parsed.mentioned == ("/etc/shadow",)


@pytest.mark.parametrize(
    "line",
    ['RW 100 FLAT "x.bin"', 'RW 100 VMFS "x.bin" 0', 'RW 100 flat "x.bin" 0', 'RW 1 FLAT "x'],
)
def test_vmdk_lines_qemu_calls_invalid_are_refused(line):
    with pytest.raises(FormatError, match="invalid VMDK extent line"):
        fmts.parse_vmdk_descriptor(descriptor(line))


def test_vmdk_extent_numbers_are_read_like_sscanf():
    parsed = fmts.parse_vmdk_descriptor(descriptor('RW +100 FLAT "x.bin" +7 trailing words'))
    assert [(e.sectors, e.offset) for e in parsed.extents] == [(100, 7)]
    # "0x10" is 0 followed by junk: skipped as qemu does.
    assert fmts.parse_vmdk_descriptor(descriptor('RW 0x10 FLAT "x.bin" 0')).extents == ()


def test_vmdk_long_names_are_cut_at_511_chars_like_qemu():
    name = "n" * 600
    parsed = fmts.parse_vmdk_descriptor(descriptor(f'RW 100 SPARSE "{name}"'))
    assert [e.filename for e in parsed.extents] == ["n" * 511]


def test_vmdk_descriptor_ends_at_the_first_nul():
    raw = descriptor('RW 100 FLAT "a.bin" 0').encode() + b"\0" + b'RW 100 FLAT "/etc/shadow" 0\n'
    parsed = fmts.parse_vmdk_descriptor(fmts.descriptor_text(raw))
    assert [e.filename for e in parsed.extents] == ["a.bin"]
    assert "/etc/shadow" not in parsed.mentioned


def test_vmdk_parent_hint_is_found_like_strstr_even_in_a_comment():
    window = b'# parentFileNameHint="nbd://127.0.0.1:10809"\ncreateType="monolithicSparse"\n'
    assert fmts.vmdk_parent_hint(window) == "nbd://127.0.0.1:10809"
    assert fmts.vmdk_parent_hint(b'parentFileNameHint="base.vmdk"\n') == "base.vmdk"
    assert fmts.vmdk_parent_hint(b'parentFileNameHint=""\n') is None
    assert fmts.vmdk_parent_hint(b"createType=x\n") is None
    with pytest.raises(FormatError, match="malformed"):
        fmts.vmdk_parent_hint(b'parentFileNameHint="no end')


def test_vmdk_parent_hint_beyond_the_window_is_not_seen():
    window = bytes(fmts.VMDK_DESC_SIZE) + b'parentFileNameHint="x"'
    assert fmts.vmdk_parent_hint(window.replace(b"\0", b" ")) is None


# --------------------------------------------------------------------------- VMDK sparse


def test_vmdk_sparse_header_fields():
    header = fmts.parse_vmdk_sparse_header(vmdk_sparse_header(capacity=4096, desc_offset=1))
    assert header.capacity == 4096 and header.granularity == 128
    assert not header.holds_descriptor
    assert fmts.parse_vmdk_sparse_header(vmdk_sparse_header(capacity=0)).holds_descriptor


def test_vmdk_sparse_data_end_from_grain_tables():
    # capacity 1024 sectors, 128-sector grains, 512 entries per table: one table.
    buf = bytearray(vmdk_sparse_header(capacity=1024, gd_offset=2))
    buf += bytearray(3 * 512 + 2048)
    struct.pack_into("<I", buf, 2 * 512, 3)  # GD[0] -> GT at sector 3
    struct.pack_into("<I", buf, 3 * 512 + 4, 40)  # GT[1] -> grain at sector 40
    header = fmts.parse_vmdk_sparse_header(bytes(buf[:512]))
    end = fmts.vmdk_sparse_data_end(header, reader(bytes(buf)))
    assert end.image == (40 + 128) * 512
    assert end.slack == 128 * 512


def test_vmdk_stream_optimized_is_left_to_qemus_footer_check():
    header = fmts.parse_vmdk_sparse_header(vmdk_sparse_header(gd_offset=fmts.VMDK_GD_AT_END))
    assert fmts.vmdk_sparse_data_end(header, reader(b"")).image == 0


# --------------------------------------------------------------------------- VHD, VHDX, VDI


def test_vpc_footer_types():
    assert fmts.parse_vpc_footer(vpc_footer(fmts.VPC_DIFFERENCING)).disk_type == 4
    assert fmts.parse_vpc_footer(vpc_footer(3, size=5 << 20)).current_size == 5 << 20
    with pytest.raises(FormatError):
        fmts.parse_vpc_footer(bytes(512))


def vhdx_image(*, has_parent: bool = False, locator: bool = False) -> bytes:
    buf = bytearray(2 * 1024 * 1024)
    buf[:8] = b"vhdxfile"
    metadata_at = 1024 * 1024
    table = 192 * 1024
    buf[table : table + 4] = b"regi"
    struct.pack_into("<I", buf, table + 8, 1)
    buf[table + 16 : table + 32] = fmts.VHDX_METADATA_REGION.bytes_le
    struct.pack_into("<QI", buf, table + 32, metadata_at, 1024 * 1024)
    buf[metadata_at : metadata_at + 8] = b"metadata"
    items: list[tuple[uuid.UUID, bytes]] = [
        (fmts.VHDX_FILE_PARAMETERS, struct.pack("<II", 1 << 25, 2 if has_parent else 0)),
        (fmts.VHDX_VIRTUAL_SIZE, struct.pack("<Q", 3 << 30)),
    ]
    if locator:
        items.append((fmts.VHDX_PARENT_LOCATOR, b"\0" * 20))
    struct.pack_into("<H", buf, metadata_at + 10, len(items))
    data_at = 64 * 1024
    for i, (guid, data) in enumerate(items):
        entry = metadata_at + 32 + i * 32
        buf[entry : entry + 16] = guid.bytes_le
        struct.pack_into("<II", buf, entry + 16, data_at, len(data))
        buf[metadata_at + data_at : metadata_at + data_at + len(data)] = data
        data_at += 4096
    return bytes(buf)


def test_vhdx_differencing_is_detected_by_flag_or_locator():
    assert fmts.parse_vhdx(reader(vhdx_image())) == fmts.VhdxInfo(False, 3 << 30)
    assert fmts.parse_vhdx(reader(vhdx_image(has_parent=True))).has_parent
    assert fmts.parse_vhdx(reader(vhdx_image(locator=True))).has_parent
    with pytest.raises(FormatError):
        fmts.parse_vhdx(reader(b"vhdxfile" + bytes(300 * 1024)))


def test_vdi_header_and_data_end():
    buf = bytearray(vdi_header(blocks=4, block_size=1 << 20)) + bytearray(512)
    struct.pack_into("<IIII", buf, 512, 0, fmts.VDI_UNALLOCATED, 2, fmts.VDI_DISCARDED)
    header = fmts.parse_vdi_header(bytes(buf[:512]))
    assert header.disk_size == 4 << 20
    assert fmts.vdi_data_end(header, reader(bytes(buf))).image == 1024 + 3 * (1 << 20)
    assert fmts.parse_vdi_header(vdi_header(image_type=4)).type_name == "differencing"
