"""What a VM keeps between steps (pure parts): the record, the scan it carries, the LVM
cache key and the host-local device names kept out of cached layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.guestvm import (
    LVInfo,
    VMScan,
    lvm_cache_key,
    tokenize_devices,
    untokenize_devices,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.vmstate import (
    MEMBER_FILE,
    VM_FILE,
    VMRecord,
    boot_of,
    is_sibling_attach,
    mark_member,
)
from vmcraft_tasks.craft.volumes import LVName, VolumeTable


def test_the_lvm_key_names_every_pv_disk_with_its_generation() -> None:
    one = lvm_cache_key([("aaa", 0), ("bbb", 0)], [(0, 3), (1, 0)])
    assert "aaa@g0" in one and "bbb@g0" in one and ":lvm:" in one
    # An edit of either disk (a new generation) is another key.
    assert lvm_cache_key([("aaa", 0), ("bbb", 1)], [(0, 3), (1, 0)]) != one
    assert lvm_cache_key([("aaa", 1), ("bbb", 0)], [(0, 3), (1, 0)]) != one
    # So is a PV found elsewhere on the same disks.
    assert lvm_cache_key([("aaa", 0), ("bbb", 0)], [(0, 2), (1, 0)]) != one
    assert lvm_cache_key([("aaa", 0), ("bbb", 0)], [(0, 3), (1, 0)]) == one


def test_device_names_are_positions_in_a_cached_layout() -> None:
    report = {
        "pvs": {"report": [{"pv": [{"pv_name": "/dev/loop1"}, {"pv_name": "/dev/loop12"}]}]},
        "lvs": {"report": [{"seg": [{"devices": "/dev/loop12(0),/dev/loop1(8)"}]}]},
    }
    tokens = tokenize_devices(report, ["/dev/loop1", "/dev/loop12"])
    text = json.dumps(tokens)
    assert "/dev/loop" not in text
    assert "@pv1@(0),@pv0@(8)" in text
    # Another attach of the same disks: the same layout on its own devices.
    again = untokenize_devices(tokens, ["/dev/loop7", "/dev/loop70"])
    assert again["lvs"]["report"][0]["seg"][0]["devices"] == "/dev/loop70(0),/dev/loop7(8)"
    assert untokenize_devices(tokens, ["/dev/loop1", "/dev/loop12"]) == report
    assert tokenize_devices(report, []) == report


def test_a_scan_survives_the_record_and_rebuilds_its_volume_table() -> None:
    disks = [
        [
            Partition(1, 2048, 4096, 512, "gpt", "linux"),
            Partition(2, 8192, 4096, 512, "gpt", "lvm"),
        ],
        [],
    ]
    lv = LVInfo(
        vg="rl",
        vg_uuid="vg1",
        lv="root",
        lv_uuid="lv1",
        size=4096,
        volume=100000,
        method="loop",
        device="/dev/loop9",
    )
    table = VolumeTable.build(disks, [LVName("rl", "root", "vg1")])
    scan = VMScan(
        volumes=table,
        disks=disks,
        partitions=table.vm_partitions(disks),
        filesystems=[Filesystem(1, "ext4", uuid="u1"), Filesystem(100000, "xfs", uuid="u2")],
        lvs=[lv],
        notes=["a note"],
    )
    again = VMScan.from_dict(json.loads(json.dumps(scan.to_dict())))
    assert again.lvs == [lv] and again.notes == ["a note"]
    assert again.filesystems == scan.filesystems
    assert [v.number for v in again.volumes.volumes()] == [v.number for v in table.volumes()]
    assert [p.number for p in again.partitions] == [1, 2]
    assert again.volumes.get(1000) is not None  # disk 2, whole


def _attach(root: Path, name: str) -> str:
    path = root / name
    path.mkdir()
    return str(path)


def test_a_member_points_back_to_its_boot_disk(tmp_path: Path) -> None:
    boot, member = _attach(tmp_path, "attach-boot"), _attach(tmp_path, "attach-two")
    VMRecord(disks=[boot, member], readonly=True).save(boot)
    mark_member(member, boot)
    assert boot_of(member) == boot and boot_of(boot) == boot
    record = VMRecord.load(boot)
    assert record is not None and record.disks == [boot, member] and record.scan is None
    assert VMRecord.load(member) is None  # a member holds no record


def test_a_member_file_naming_a_stranger_is_ignored(tmp_path: Path) -> None:
    member = _attach(tmp_path, "attach-two")
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    stranger = _attach(elsewhere, "attach-x")
    Path(member, MEMBER_FILE).write_text(json.dumps({"boot": stranger}))
    assert boot_of(member) == member
    Path(member, MEMBER_FILE).write_text(json.dumps({"boot": "/etc"}))
    assert boot_of(member) == member
    Path(member, MEMBER_FILE).write_text("not json")
    assert boot_of(member) == member
    assert not is_sibling_attach(str(tmp_path / "notanattach"), member)
    assert is_sibling_attach(os.path.join(str(tmp_path), "attach-y"), member)


def test_a_record_that_does_not_start_with_its_boot_disk_is_refused(tmp_path: Path) -> None:
    boot, other = _attach(tmp_path, "attach-boot"), _attach(tmp_path, "attach-two")
    Path(boot, VM_FILE).write_text(json.dumps({"disks": [other, boot], "readonly": True}))
    with pytest.raises(VMCraftError, match="does not start with its boot disk"):
        VMRecord.load(boot)
    Path(boot, VM_FILE).write_text("{")
    with pytest.raises(VMCraftError, match="unreadable VM record"):
        VMRecord.load(boot)
