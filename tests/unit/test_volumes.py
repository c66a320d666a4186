"""VM-wide volume numbering and fstab resolution across disks and LVs (pure)."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.inspect.fstab import parse_fstab, resolve_fstab, resolve_spec
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import (
    LVName,
    VolumeTable,
    VolumeTableError,
    disk_index,
    disk_volume,
    split_mapper_name,
)


def part(number: int, *, uuid: str | None = None, name: str | None = None) -> Partition:
    return Partition(
        number=number,
        start_sector=2048 * number,
        size_sectors=2048,
        sector_size=512,
        type="0fc63daf-8483-4772-8e79-3d69d8477de4",
        table="gpt",
        uuid=uuid,
        name=name,
    )


DISKS = [[part(1), part(2), part(3)], [part(1), part(2, uuid="AB-2")]]
LVS = [
    LVName("rl", "root", "uuid-b"),
    LVName("rl", "home", "uuid-b"),
    LVName("data", "srv-x", "uuid-a"),
]


def table() -> VolumeTable:
    return VolumeTable.build(DISKS, LVS)


def test_the_boot_disk_keeps_its_numbers_and_other_volumes_are_numbered_vm_wide():
    t = table()
    boot = t.on_disk(0, 2)
    assert boot is not None and boot.number == 2 and boot.label == "partition 2"
    second = t.on_disk(1, 2)
    assert second is not None and second.number == 1002
    assert second.label == "disk 2 partition 2"
    whole = t.on_disk(1, 0)
    assert whole is not None and whole.label == "disk 2 (whole disk)"
    assert t.on_disk(1, 3) is None and t.on_disk(2, 1) is None
    # LVs: by VG uuid, then name; numbered after every disk.
    assert [(v.vg, v.lv, v.number) for v in t.volumes() if v.is_lv] == [
        ("data", "srv-x", 100000),
        ("rl", "home", 100001),
        ("rl", "root", 100002),
    ]
    root = t.get(100002)
    assert root is not None and root.label == "LV rl/root"
    assert t.disks() == 2


def test_two_vgs_of_one_name_are_two_vgs():
    t = VolumeTable.build([[part(1)]], [LVName("rl", "root", "u1"), LVName("rl", "root", "u2")])
    assert len(t.lvs_named("rl", "root")) == 2


def test_limits_are_named():
    with pytest.raises(VolumeTableError, match="partition 1000"):
        VolumeTable.build([[part(1000)]])
    with pytest.raises(VolumeTableError, match="more than 99 disks"):
        VolumeTable.build([[] for _ in range(101)])


@pytest.mark.parametrize(
    ("letters", "index"), [("a", 0), ("b", 1), ("z", 25), ("aa", 26), ("ab", 27), ("A", None)]
)
def test_disk_letters(letters, index):
    assert disk_index(letters) == index


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("rl-root", ("rl", "root")),
        ("my--vg-lv--1", ("my-vg", "lv-1")),
        ("rl", None),
        ("a-b-c", None),
    ],
)
def test_mapper_names(name, split):
    assert split_mapper_name(name) == split


def fs(number: int, fstype: str = "ext4", **tags: str) -> Filesystem:
    return Filesystem(partition=number, type=fstype, **tags)


FILESYSTEMS = [
    fs(1, "vfat"),
    fs(2, uuid="aaaa-boot"),
    fs(1001, uuid="bbbb-var"),
    fs(1002, "xfs", uuid="cccc-srv"),
    fs(100001, "xfs", uuid="dddd-home", label="home"),
    fs(100002, uuid="eeee-root"),
    fs(100000, uuid="ffff-srvx"),
]


def resolve(spec: str):
    t = table()
    return resolve_spec(spec, FILESYSTEMS, t.vm_partitions(DISKS), t)


@pytest.mark.parametrize(
    ("spec", "number", "how"),
    [
        ("/dev/sda2", 2, "device-name"),
        ("/dev/sdb2", 1002, "device-name"),
        ("/dev/vdb1", 1001, "device-name"),
        ("/dev/xvdb2", 1002, "device-name"),
        ("/dev/nvme1n1p2", 1002, "device-name"),
        ("UUID=bbbb-var", 1001, "uuid"),
        ("LABEL=home", 100001, "label"),
        ("PARTUUID=ab-2", 1002, "partuuid"),
        ("/dev/mapper/rl-root", 100002, "lvm"),
        ("/dev/rl/home", 100001, "lvm"),
        ("/dev/mapper/data-srv--x", 100000, "lvm"),
        ("/dev/data/srv-x", 100000, "lvm"),
    ],
)
def test_specs_resolve_across_disks_and_lvs(spec, number, how):
    found = resolve(spec)
    assert (found.partition, found.how) == (number, how), found


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("/dev/sdc1", "/dev/sdc1 is on another disk of the guest"),
        ("/dev/sdb5", "disk 2 of the VM has no partition 5"),
        ("/dev/sdb", "/dev/sdb is a whole disk, not a partition"),
        ("/dev/mapper/rl-swap", "/dev/mapper/rl-swap: this VM has no LV rl/swap"),
        ("/dev/vg0/lv0", "/dev/vg0/lv0: this VM has no LV vg0/lv0"),
    ],
)
def test_what_does_not_resolve_says_why(spec, reason):
    found = resolve(spec)
    assert found.partition is None and found.reason == reason


def test_a_whole_disk_filesystem_on_another_disk_resolves():
    t = VolumeTable.build([[part(1)], []])
    found = resolve_spec("/dev/sdb", [fs(1, "xfs"), fs(disk_volume(1, 0), "xfs")], [], t)
    assert found.partition == 1000


def test_ambiguous_lv_names_in_one_vm_are_not_guessed():
    t = VolumeTable.build([[part(1)]], [LVName("rl", "root", "u1"), LVName("rl", "root", "u2")])
    found = resolve_spec("/dev/mapper/rl-root", [], [], t)
    assert found.partition is None and found.reason == "ambiguous: 2 VGs named rl have an LV root"


def test_without_a_volume_table_the_one_disk_answers_stay():
    assert resolve_spec("/dev/sdb2", FILESYSTEMS, []).reason == (
        "/dev/sdb2 is on another disk of the guest"
    )
    assert resolve_spec("/dev/mapper/rl-root", FILESYSTEMS, []).reason == (
        "device-mapper volumes are not partitions"
    )
    assert resolve_spec("/dev/rl/root", FILESYSTEMS, []).reason == (
        "LVM logical volumes are not partitions"
    )
    assert resolve_spec("/dev/sda9", FILESYSTEMS, []).reason == "this disk has no partition 9"


def test_a_rhel_fstab_resolves_whole():
    text = """
/dev/mapper/rl-root /      xfs  defaults 0 0
UUID=aaaa-boot      /boot  ext4 defaults 1 2
/dev/mapper/rl-home /home  xfs  defaults 0 0
UUID=bbbb-var       /var   ext4 defaults 0 0
/dev/sdb2           /srv   xfs  defaults 0 0
"""
    t = table()
    resolved = resolve_fstab(parse_fstab(text), FILESYSTEMS, t.vm_partitions(DISKS), t)
    assert [r.resolved_partition for r in resolved] == [100002, 2, 100001, 1001, 1002]
