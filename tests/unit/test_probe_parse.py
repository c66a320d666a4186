from vmcraft_tasks.craft.probe import (
    ext_superblock_needs_recovery,
    filesystem_from_blkid,
    parse_blkid_export,
)

BLKID = """DEVNAME=/dev/loop3
UUID=17134406-17df-4966-8bbd-4be4b7f58f64
VERSION=1.0
BLOCK_SIZE=1024
TYPE=ext4
USAGE=filesystem
LABEL=root fs
"""


def test_parse_export_drops_the_host_device_name():
    tags = parse_blkid_export(BLKID)
    assert "DEVNAME" not in tags
    assert tags["TYPE"] == "ext4"
    assert tags["LABEL"] == "root fs"


def test_filesystem_record_takes_partuuid_from_the_table_when_blkid_has_none():
    fs = filesystem_from_blkid(3, parse_blkid_export(BLKID), partuuid="abc-3", partlabel="root")
    assert (fs.partition, fs.type, fs.partuuid, fs.partlabel) == (3, "ext4", "abc-3", "root")
    assert fs.uuid == "17134406-17df-4966-8bbd-4be4b7f58f64"


def _superblock(incompat: int, magic: int = 0xEF53) -> bytes:
    sb = bytearray(1024)
    sb[0x38:0x3A] = magic.to_bytes(2, "little")
    sb[0x60:0x64] = incompat.to_bytes(4, "little")
    return bytes(sb)


def test_ext_recover_flag_is_read_from_the_superblock():
    assert ext_superblock_needs_recovery(_superblock(0x4 | 0x40))
    assert not ext_superblock_needs_recovery(_superblock(0x40))
    assert not ext_superblock_needs_recovery(_superblock(0x4, magic=0x1234))
    assert not ext_superblock_needs_recovery(b"short")
