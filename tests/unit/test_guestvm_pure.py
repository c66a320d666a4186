"""The pure helpers of `craft.guestvm`: VM-wide renumbering, LV names, reasons."""

from __future__ import annotations

from vmcraft_tasks.craft.guestvm import (
    LVInfo,
    describe_volumes,
    lv_names,
    lv_volume,
    no_root_reason,
    vm_filesystems,
)
from vmcraft_tasks.craft.lvm.layout import LV, VG
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import LVName, VolumeTable


def _lv(name: str, reason: str | None = None) -> LV:
    return LV(
        name=name, uuid=f"u-{name}", size=1, attr="", segtype="linear", segments=(), reason=reason
    )


def _vg(name: str, uuid: str, *lvs: str) -> VG:
    return VG(name=name, uuid=uuid, extent_size=4 << 20, pvs=(), lvs=tuple(_lv(n) for n in lvs))


def test_boot_disk_numbers_stay_and_later_disks_are_strided() -> None:
    found = [Filesystem(1, "ext4"), Filesystem(0, "xfs")]
    assert [f.partition for f in vm_filesystems(0, found)] == [1, 0]
    assert [f.partition for f in vm_filesystems(2, found)] == [2001, 2000]
    assert vm_filesystems(1, found)[0].type == "ext4"


def test_lv_names_keep_vgs_of_the_same_name_apart() -> None:
    a, b = _vg("rl", "uuid-a", "root", "var"), _vg("rl", "uuid-b", "root")
    names = lv_names([a, b])
    assert names == [
        LVName("rl", "root", "uuid-a"),
        LVName("rl", "var", "uuid-a"),
        LVName("rl", "root", "uuid-b"),
    ]
    table = VolumeTable.build([[Partition(1, 2048, 2048, 512, "", "gpt")]], names)
    assert lv_volume(table, a, a.lv("root")) != lv_volume(table, b, b.lv("root"))
    assert lv_volume(table, b, b.lv("root")) == 100_002


def test_no_root_reason_names_every_lv_left_out() -> None:
    lvs = [
        LVInfo("rl", "u", "root", "r", 1, 100_001, reason="VG rl: LV root is a thin volume"),
        LVInfo("rl", "u", "swap", "s", 1, 100_002, method="loop", device="/dev/loop3"),
    ]
    text = no_root_reason("partition 2: ext4", lvs)
    assert text.startswith("no operating system root found on any volume (partition 2: ext4)")
    assert "rl/root: VG rl: LV root is a thin volume" in text
    assert "swap" not in text
    assert "LVs not exposed" not in no_root_reason("x", lvs[1:])


def test_describe_volumes_uses_labels() -> None:
    table = VolumeTable.build(
        [[Partition(2, 2048, 2048, 512, "", "gpt")], []], [LVName("rl", "root", "u")]
    )
    found = [
        Filesystem(2, "ext4"),
        Filesystem(1000, "LVM2_member"),
        Filesystem(100_000, None, content="zeros"),
    ]
    assert describe_volumes(found, table) == (
        "partition 2: ext4; disk 2 (whole disk): LVM2_member; LV rl/root: zeros"
    )
