"""VG layouts from lvm2's JSON reports: real reports captured on the fixtures
(tests/data/lvm, by craft.lvm.tools.report) and hand-made rows for what the fixtures
do not have (raid, cache, snapshot, striped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks.craft.lvm import layout

DATA = Path(__file__).resolve().parents[1] / "data" / "lvm"
MiB = 1 << 20


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return data


def one_vg(name: str) -> layout.VG:
    vgs = layout.parse(load(name))
    assert len(vgs) == 1
    return vgs[0]


def test_rhel_lvm_two_pvs_four_lvs():
    vg = one_vg("rhel_lvm")
    assert vg.name == "rl" and vg.extent_size == 4 * MiB
    assert len(vg.pvs) == 2 and vg.missing_pvs == ()
    assert {pv.pe_start for pv in vg.pvs} == {MiB}
    assert [lv.name for lv in vg.lvs] == ["home", "root", "swap", "var"]
    assert all(lv.exposable for lv in vg.lvs)
    root, home, var = vg.lv("root"), vg.lv("home"), vg.lv("var")
    assert root.size == 128 * MiB and root.multi_segment
    assert [(s.start_extent, s.extent_count, s.pv_start_extent) for s in root.segments] == [
        (0, 8, 0),
        (8, 24, 87),
    ]
    assert len({s.pv_uuid for s in root.segments}) == 1
    assert [(s.start_extent, s.extent_count, s.pv_start_extent) for s in home.segments] == [
        (0, 2, 111),
        (2, 10, 0),
    ]
    assert len({s.pv_uuid for s in home.segments}) == 2
    assert all(s.pv_device for s in home.segments)
    assert not var.multi_segment and var.size == 300 * MiB
    assert vg.mapper_name(root) == "rl-root"


def test_missing_pv_names_the_pv_and_the_lv():
    vg = one_vg("rhel_lvm_missing_pv")
    full = one_vg("rhel_lvm")
    (missing,) = vg.missing_pvs
    assert missing in {pv.uuid for pv in full.pvs}
    assert vg.pv(missing).device is None and vg.pv(missing).missing
    home = vg.lv("home")
    assert home.reason == (
        f"VG rl: PV {missing} is missing (a disk left out of the manifest?); "
        "LV home has a segment on it"
    )
    assert home.segments[1].pv_uuid == missing and home.segments[1].pv_device is None
    assert [lv.name for lv in vg.lvs if lv.exposable] == ["root", "swap", "var"]


def test_thin_pool_and_thin_root_get_reasons_and_internals_are_listed():
    vg = one_vg("thin_root")
    assert [lv.name for lv in vg.lvs] == ["pool00", "root", "swap"]
    root = vg.lv("root")
    assert root.segtype == "thin" and root.pool_lv == "pool00"
    assert root.reason == (
        "VG rl: LV root is a thin volume in pool pool00: thin provisioning needs the "
        "kernel's dm-thin; not supported in userspace"
    )
    assert vg.lv("pool00").reason == (
        "VG rl: LV pool00 is a thin pool: it holds thin volumes, not a filesystem"
    )
    assert vg.lv("swap").exposable
    assert [lv.name for lv in vg.internal_lvs] == ["lvol0_pmspare", "pool00_tdata", "pool00_tmeta"]
    assert all(lv.hidden and lv.reason and "internal" in lv.reason for lv in vg.internal_lvs)


def test_two_vgs_named_rl_stay_apart_by_uuid():
    a, b = load("rhel_lvm"), load("rhel_lvm_twin")
    merged = {
        key: {"report": a[key]["report"] + b[key]["report"]} for key in ("pvs", "lvs", "pvsegs")
    }
    vgs = layout.parse(merged)
    assert [vg.name for vg in vgs] == ["rl", "rl"]
    assert len({vg.uuid for vg in vgs}) == 2
    by_uuid = {vg.uuid: vg for vg in vgs}
    for single in (one_vg("rhel_lvm"), one_vg("rhel_lvm_twin")):
        assert by_uuid[single.uuid] == single


# --------------------------------------------------------------------------- hand-made rows

VG_UUID = "vgvgvg-0000-0000-0000-0000-0000-000000"
PV_A = "pvaaaa-0000-0000-0000-0000-0000-000000"
PV_B = "pvbbbb-0000-0000-0000-0000-0000-000000"


def _report(lv_rows: list[dict[str, str]], pvseg_rows: list[dict[str, str]]) -> dict[str, Any]:
    base = {"vg_name": "data", "vg_uuid": VG_UUID, "vg_extent_size": str(4 * MiB)}
    pvs = [
        {
            **base,
            "pv_name": "/dev/loop1",
            "pv_uuid": PV_A,
            "pe_start": str(MiB),
            "pv_size": "0",
            "dev_size": "0",
            "pv_pe_count": "100",
            "pv_missing": "",
            "pv_attr": "a--",
        },
        {
            **base,
            "pv_name": "/dev/loop2",
            "pv_uuid": PV_B,
            "pe_start": str(MiB),
            "pv_size": "0",
            "dev_size": "0",
            "pv_pe_count": "100",
            "pv_missing": "",
            "pv_attr": "a--",
        },
    ]
    segs = [{**base, **row} for row in lv_rows]
    pvsegs = [{"vg_uuid": VG_UUID, **row} for row in pvseg_rows]
    return {
        "pvs": {"report": [{"pv": pvs}]},
        "lvs": {"report": [{"seg": segs}]},
        "pvsegs": {"report": [{"pvseg": pvsegs}]},
    }


def _lv(name: str, uuid: str, segtype: str, attr: str, **extra: str) -> dict[str, str]:
    row = {
        "lv_name": name,
        "lv_uuid": uuid,
        "lv_attr": attr,
        "lv_size": str(40 * MiB),
        "segtype": segtype,
        "seg_start_pe": "0",
        "seg_size_pe": "10",
        "stripes": "1",
        "pool_lv": "",
        "origin": "",
        "lv_layout": segtype,
        "lv_role": "public",
    }
    row.update(extra)
    return row


def _pvseg(pv: str, start: int, lv_uuid: str, lv_start: int = 0, size: int = 10) -> dict[str, str]:
    return {
        "pv_uuid": pv,
        "pv_name": "/dev/loop1" if pv == PV_A else "/dev/loop2",
        "pvseg_start": str(start),
        "pvseg_size": str(size),
        "lv_uuid": lv_uuid,
        "lv_name": "",
        "seg_start_pe": str(lv_start),
        "segtype": "linear",
    }


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            _lv("mirror", "u1", "raid1", "rwi-a-r---", stripes="2"),
            "VG data: LV mirror is a RAID/mirror LV (raid1): not supported in userspace",
        ),
        (
            _lv("old", "u2", "mirror", "mwi-a-m---"),
            "VG data: LV old is a RAID/mirror LV (mirror): not supported in userspace",
        ),
        (
            _lv("fast", "u3", "cache", "Cwi-a-C---", pool_lv="[fastpool_cpool]"),
            "VG data: LV fast is a cached LV (cache): dm-cache needs the kernel; "
            "not supported in userspace",
        ),
        (
            _lv("wc", "u4", "writecache", "Cwi-a-C---"),
            "VG data: LV wc is a cached LV (writecache): dm-cache needs the kernel; "
            "not supported in userspace",
        ),
        (
            _lv("snap", "u5", "linear", "swi-a-s---", origin="home"),
            "VG data: LV snap is a snapshot of home: copy-on-write snapshots need the kernel's "
            "dm-snapshot; not supported in userspace",
        ),
        (
            _lv("vdo", "u6", "vdo", "vwi-a-v---"),
            "VG data: LV vdo has segments of type vdo: not supported",
        ),
    ],
)
def test_unsupported_kinds_each_get_their_reason(row, expected):
    (vg,) = layout.parse(_report([row], []))
    (lv,) = vg.lvs
    assert lv.reason == expected
    assert not lv.exposable


def test_a_snapshot_origin_itself_is_exposable():
    row = _lv("home", "u7", "linear", "owi-a-s---")
    (vg,) = layout.parse(_report([row], [_pvseg(PV_A, 5, "u7")]))
    assert vg.lvs[0].exposable
    assert vg.lvs[0].segments[0].pv_start_extent == 5


def test_striped_over_two_pvs_is_reported():
    row = _lv("wide", "u8", "striped", "-wi-a-----", stripes="2")
    (vg,) = layout.parse(_report([row], [_pvseg(PV_A, 0, "u8"), _pvseg(PV_B, 0, "u8")]))
    assert vg.lvs[0].reason == "VG data: LV wide is striped over 2 PVs: not supported yet"


def test_segments_are_ordered_and_matched_to_their_pv_segments():
    rows = [
        _lv("data", "u9", "linear", "-wi-a-----", seg_start_pe="10", seg_size_pe="5"),
        _lv("data", "u9", "linear", "-wi-a-----", seg_start_pe="0", seg_size_pe="10"),
    ]
    pvsegs = [_pvseg(PV_B, 50, "u9", lv_start=10, size=5), _pvseg(PV_A, 20, "u9", lv_start=0)]
    (vg,) = layout.parse(_report(rows, pvsegs))
    lv = vg.lv("data")
    assert [(s.start_extent, s.pv_uuid, s.pv_device, s.pv_start_extent) for s in lv.segments] == [
        (0, PV_A, "/dev/loop1", 20),
        (10, PV_B, "/dev/loop2", 50),
    ]
    assert lv.exposable and lv.multi_segment


def test_an_lv_whose_pv_segment_is_unknown_is_not_exposable():
    (vg,) = layout.parse(_report([_lv("lost", "u10", "linear", "-wi-a-----")], []))
    assert vg.lvs[0].reason == "VG data: LV lost: a segment's PV is unknown"


def test_luks_reason_names_the_option():
    assert layout.luks_reason("rl/home") == (
        "rl/home is LUKS-encrypted: opening it needs the LUKS passphrase "
        "(options.luks_keys, not supported yet)"
    )


def test_lookups_fail_loudly():
    vg = one_vg("rhel_lvm")
    with pytest.raises(KeyError):
        vg.lv("nope")
    with pytest.raises(KeyError):
        vg.pv("nope")
