"""fstab parsing and resolution to partition numbers of the inspected disk."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.inspect.fstab import (
    FstabEntry,
    classify_entry,
    decode_octal_escapes,
    decode_udev_escapes,
    parse_fstab,
    resolve_fstab,
    resolve_spec,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

ROOT_UUID = "0b3c6a5e-8f1d-4a4e-9a53-3d2b1f0e9c11"
BOOT_UUID = "5d1a2b3c-aaaa-bbbb-cccc-000000000002"

FILESYSTEMS = [
    Filesystem(1, "vfat", uuid="ABCD-1234", label="EFI", partuuid="p-1", partlabel="EFI System"),
    Filesystem(2, "ext4", uuid=BOOT_UUID, label="boot", partuuid="p-2", partlabel="boot"),
    Filesystem(3, "ext4", uuid=ROOT_UUID, label="My Root", partuuid="p-3", partlabel="root fs"),
    Filesystem(5, "swap", uuid="11111111-2222-3333-4444-555555555555", partuuid="p-5"),
]


def _part(
    number: int,
    *,
    uuid: str | None = None,
    name: str | None = None,
    table: str = "gpt",
    type: str = "83",
    extended: bool = False,
) -> Partition:
    return Partition(
        number=number,
        start_sector=2048 * number,
        size_sectors=2048,
        sector_size=512,
        type=type,
        table=table,
        name=name,
        uuid=uuid,
        extended=extended,
    )


PARTITIONS = [
    _part(1, uuid="p-1", name="EFI System"),
    _part(2, uuid="p-2", name="boot"),
    _part(3, uuid="p-3", name="root fs"),
    _part(4, uuid="p-4", name="spare"),
    _part(5, uuid="p-5"),
]

FSTAB = """\
# /etc/fstab: static file system information.
#
UUID=0b3c6a5e-8f1d-4a4e-9a53-3d2b1f0e9c11 /               ext4    errors=remount-ro 0       1

LABEL=boot  /boot  ext4  defaults  1  2
   UUID=abcd-1234   /boot/efi   vfat   umask=0077   0   1
/dev/sda5 none swap sw 0 0
proc /proc proc defaults 0 0
tmpfs /tmp tmpfs nosuid,nodev
/srv/My\\040Data /mnt/my\\040data none bind 0 0
nas.example.com:/export /mnt/nas nfs4 ro,_netdev 0 0
/swapfile none swap sw 0 0
/dev/mapper/vg0-var /var xfs defaults 0 0
onlyonefield
"""


def test_parse_fstab_fields_comments_and_defaults() -> None:
    entries = parse_fstab(FSTAB + "/dev/vda3 /data\n")
    assert len(entries) == 11
    root = entries[0]
    assert root == FstabEntry(
        spec=f"UUID={ROOT_UUID}",
        mountpoint="/",
        fstype="ext4",
        options=("errors=remount-ro",),
        freq=0,
        passno=1,
    )
    assert entries[1].freq == 1 and entries[1].passno == 2
    tmp = entries[5]
    assert (tmp.options, tmp.freq, tmp.passno) == (("nosuid", "nodev"), 0, 0)
    short = entries[-1]
    assert (short.fstype, short.options, short.freq, short.passno) == (
        "auto",
        ("defaults",),
        0,
        0,
    )
    assert all(e.spec != "onlyonefield" for e in entries)


def test_parse_fstab_decodes_octal_escapes() -> None:
    bind = parse_fstab(FSTAB)[6]
    assert bind.spec == "/srv/My Data"
    assert bind.mountpoint == "/mnt/my data"
    assert bind.to_dict()["options"] == ["bind"]


def test_decode_escapes() -> None:
    assert decode_octal_escapes(r"a\040b\011c\134d") == "a b\tc\\d"
    # Escaped bytes that form one UTF-8 character decode to that character.
    assert decode_octal_escapes(r"caf\303\251") == "café"
    assert decode_octal_escapes("plain") == "plain"
    assert decode_udev_escapes(r"My\x20Root") == "My Root"


@pytest.mark.parametrize(
    ("spec", "partition", "how"),
    [
        (f"UUID={ROOT_UUID}", 3, "uuid"),
        (f'UUID="{ROOT_UUID.upper()}"', 3, "uuid"),
        ("UUID=abcd-1234", 1, "uuid"),
        (f"/dev/disk/by-uuid/{BOOT_UUID}", 2, "uuid"),
        ("LABEL=boot", 2, "label"),
        ("LABEL=My Root", 3, "label"),
        (r"/dev/disk/by-label/My\x20Root", 3, "label"),
        ("PARTUUID=p-2", 2, "partuuid"),
        ("PARTUUID=P-4", 4, "partuuid"),
        ("/dev/disk/by-partuuid/p-3", 3, "partuuid"),
        ("PARTLABEL=EFI System", 1, "partlabel"),
        ("PARTLABEL=spare", 4, "partlabel"),
        (r"/dev/disk/by-partlabel/root\x20fs", 3, "partlabel"),
        ("/dev/sda1", 1, "device-name"),
        ("/dev/vda3", 3, "device-name"),
        ("/dev/hda2", 2, "device-name"),
        ("/dev/xvda5", 5, "device-name"),
        ("/dev/nvme0n1p3", 3, "device-name"),
        ("/dev/mmcblk0p2", 2, "device-name"),
    ],
)
def test_resolve_spec_styles(spec: str, partition: int, how: str) -> None:
    found = resolve_spec(spec, FILESYSTEMS, PARTITIONS)
    assert (found.partition, found.how, found.reason) == (partition, how, None)


@pytest.mark.parametrize(
    ("spec", "how", "reason_part"),
    [
        ("/dev/sdb1", "device-name", "another disk"),
        ("/dev/vdc2", "device-name", "another disk"),
        ("/dev/nvme1n1p1", "device-name", "another disk"),
        ("/dev/sda", "device-name", "whole disk"),
        ("/dev/sda9", "device-name", "no partition 9"),
        ("/dev/mapper/vg0-root", "device-mapper", "device-mapper"),
        ("/dev/dm-0", "device-mapper", "device-mapper"),
        ("/dev/vg0/root", "lvm", "LVM"),
        ("/dev/md0", "md", "RAID"),
        ("/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001-part1", "by-id", "hardware"),
        ("UUID=00000000-0000-0000-0000-000000000000", "uuid", "no partition"),
        ("LABEL=BOOT", "label", "no partition"),
        ("/dev/zram0", "device-name", "unrecognised"),
    ],
)
def test_resolve_spec_unresolved(spec: str, how: str, reason_part: str) -> None:
    found = resolve_spec(spec, FILESYSTEMS, PARTITIONS)
    assert found.partition is None
    assert found.how == how
    assert found.reason is not None and reason_part in found.reason


def test_extended_container_and_ambiguous_uuid() -> None:
    parts = [_part(2, table="dos", type="5", extended=True), _part(5, table="dos")]
    found = resolve_spec("/dev/sda2", [], parts)
    assert found.partition is None and "extended" in (found.reason or "")
    clones = [Filesystem(1, "ext4", uuid="same"), Filesystem(2, "ext4", uuid="same")]
    ambiguous = resolve_spec("UUID=same", clones, [])
    assert ambiguous.partition is None
    assert ambiguous.reason == "ambiguous: partitions 1, 2 all match UUID=same"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("UUID=x / ext4 defaults 0 1", "device"),
        ("/dev/sda5 none swap sw 0 0", "device"),
        ("proc /proc proc defaults 0 0", "virtual"),
        ("tmpfs /tmp tmpfs defaults 0 0", "virtual"),
        ("sysfs /sys sysfs defaults 0 0", "virtual"),
        ("devpts /dev/pts devpts gid=5 0 0", "virtual"),
        ("none /dev/shm tmpfs defaults 0 0", "virtual"),
        ("nas:/export /mnt nfs defaults 0 0", "network"),
        ("[fe80::1]:/export /mnt nfs4 defaults 0 0", "network"),
        ("//server/share /mnt cifs credentials=/x 0 0", "network"),
        ("host:/data /mnt fuse.sshfs defaults 0 0", "network"),
        ("/srv/data /data none bind 0 0", "bind"),
        ("/swapfile none swap sw 0 0", "swapfile"),
        ("/var/disk.img /mnt/img ext4 loop 0 0", "file"),
        ("weird /mnt auto defaults 0 0", "unknown"),
    ],
)
def test_classify_entry(line: str, kind: str) -> None:
    (entry,) = parse_fstab(line)
    assert classify_entry(entry) == kind


def test_resolve_fstab_keeps_every_entry() -> None:
    resolved = resolve_fstab(parse_fstab(FSTAB), FILESYSTEMS, PARTITIONS)
    summary = [(r.entry.mountpoint, r.kind, r.resolved_partition, r.how) for r in resolved]
    assert summary == [
        ("/", "device", 3, "uuid"),
        ("/boot", "device", 2, "label"),
        ("/boot/efi", "device", 1, "uuid"),
        ("none", "device", 5, "device-name"),
        ("/proc", "virtual", None, "none"),
        ("/tmp", "virtual", None, "none"),
        ("/mnt/my data", "bind", None, "none"),
        ("/mnt/nas", "network", None, "none"),
        ("none", "swapfile", None, "none"),
        ("/var", "device", None, "device-mapper"),
    ]
    as_dict = resolved[0].to_dict()
    assert as_dict["spec"] == f"UUID={ROOT_UUID}"
    assert as_dict["resolved_partition"] == 3
    assert as_dict["kind"] == "device"
    assert as_dict["options"] == ["errors=remount-ro"]


def test_resolution_never_yields_a_host_device_path() -> None:
    resolved = resolve_fstab(parse_fstab(FSTAB), FILESYSTEMS, PARTITIONS)
    for item in resolved:
        assert item.resolved_partition is None or isinstance(item.resolved_partition, int)
        data = item.to_dict()
        # Only the guest's own spec may mention /dev; nothing we computed does.
        for key in ("resolved_partition", "how", "kind"):
            assert "/dev/" not in str(data[key])
