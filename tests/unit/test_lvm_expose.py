"""Extent maps, the device-mapper kernel path (table and names; not runnable here),
helper command lines and the segment plugin's request splitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmcraft_tasks.craft.lvm import expose, layout, segment_plugin
from vmcraft_tasks.craft.lvm.expose import Extent, LVExposeError, PVLocation

DATA = Path(__file__).resolve().parents[1] / "data" / "lvm"
MiB = 1 << 20


def vg_of(name: str) -> layout.VG:
    (vg,) = layout.parse(json.loads((DATA / f"{name}.json").read_text()))
    return vg


def test_extent_map_of_a_two_segment_lv_on_one_pv():
    vg = vg_of("rhel_lvm")
    root = vg.lv("root")
    pv = root.segments[0].pv_uuid
    assert pv is not None
    where = {pv: PVLocation("/attach/disk", 68 * MiB)}
    assert expose.extent_map(vg, root, where) == (
        Extent(0, 32 * MiB, "/attach/disk", 68 * MiB + MiB),
        Extent(32 * MiB, 96 * MiB, "/attach/disk", 68 * MiB + MiB + 87 * 4 * MiB),
    )


def test_extent_map_defaults_to_the_devices_lvm_saw():
    vg = vg_of("rhel_lvm")
    home = vg.lv("home")
    extents = expose.extent_map(vg, home, expose.pv_locations(vg))
    assert [e.path for e in extents] == [s.pv_device for s in home.segments]
    assert [e.offset for e in extents] == [MiB + 111 * 4 * MiB, MiB]
    assert sum(e.length for e in extents) == home.size


def test_an_lv_with_a_reason_has_no_map():
    vg = vg_of("rhel_lvm_missing_pv")
    with pytest.raises(LVExposeError, match="is missing"):
        expose.extent_map(vg, vg.lv("home"), expose.pv_locations(vg))
    thin = vg_of("thin_root")
    with pytest.raises(LVExposeError, match="thin volume"):
        expose.extent_map(thin, thin.lv("root"), expose.pv_locations(thin))


def test_a_pv_without_a_location_is_an_error():
    vg = vg_of("rhel_lvm")
    with pytest.raises(LVExposeError, match="no location given"):
        expose.extent_map(vg, vg.lv("root"), {})


def test_dm_table_one_linear_line_per_segment_in_sectors():
    vg = vg_of("rhel_lvm")
    home = vg.lv("home")
    devices = {s.pv_uuid: f"/dev/nbd{i}p3" for i, s in enumerate(home.segments) if s.pv_uuid}
    extent = 4 * MiB // 512
    assert expose.dm_table(vg, home, devices) == (
        f"0 {2 * extent} linear /dev/nbd0p3 {2048 + 111 * extent}\n"
        f"{2 * extent} {10 * extent} linear /dev/nbd1p3 2048\n"
    )
    root = vg.lv("root")
    pv = root.segments[0].pv_uuid
    assert pv is not None
    assert expose.dm_table(vg, root, {pv: "/dev/nbd0p3"}).splitlines() == [
        f"0 {8 * extent} linear /dev/nbd0p3 2048",
        f"{8 * extent} {24 * extent} linear /dev/nbd0p3 {2048 + 87 * extent}",
    ]


def test_dm_names_never_collide_between_vms_or_with_the_host():
    a, b = vg_of("rhel_lvm"), vg_of("rhel_lvm_twin")
    assert a.name == b.name == "rl"
    names = {
        expose.dm_name(attach, vg, vg.lv(lv))
        for attach in ("attach-1a2b3c4d", "attach-5e6f7a8b")
        for vg in (a, b)
        for lv in ("root", "home", "var", "swap")
    }
    assert len(names) == 16
    name = expose.dm_name("attach-1a2b3c4d", a, a.lv("root"))
    assert name.startswith("vmcraft-attach-1a2b3c4d-")
    assert name.endswith(a.uuid.replace("-", "") + "-" + a.lv("root").uuid.replace("-", ""))
    assert "rl-root" not in name  # what the host's own VG rl would be called
    assert len(name) <= expose.DM_NAME_MAX
    # Same VM attached twice (a clone with the same uuids): the attach id tells them apart.
    assert expose.dm_name("x", a, a.lv("root")) != expose.dm_name("y", a, a.lv("root"))
    assert expose.dm_name("a/b c", a, a.lv("root")).startswith("vmcraft-a_b_c-")
    with pytest.raises(ValueError):
        expose.dm_name("x" * 100, a, a.lv("root"))


def test_helper_command_lines():
    # Daemonised, not --foreground: in the foreground nbdkit asks for a parent-death
    # signal, tied to the thread that started it.
    assert expose.nbdkit_argv("/s/sock", "/s/pid", "/s/map.json", writable=False) == [
        "nbdkit",
        "--log=stderr",
        "--unix",
        "/s/sock",
        "--pidfile",
        "/s/pid",
        "--readonly",
        "python",
        expose.PLUGIN,
        "map=/s/map.json",
    ]
    assert "--readonly" not in expose.nbdkit_argv("/s", "/p", "/m", writable=True)
    assert expose.nbdfuse_argv("/s/lv", "/s/sock", "/s/pid", writable=False) == [
        "nbdfuse",
        "-P",
        "/s/pid",
        "--readonly",
        "/s/lv",
        "--unix",
        "/s/sock",
    ]
    assert Path(expose.PLUGIN).is_file()


def test_state_dirs_are_short_and_per_lv(tmp_path):
    vg = vg_of("rhel_lvm")
    dirs = {expose.state_dir_for(str(tmp_path), vg, lv) for lv in vg.lvs}
    assert len(dirs) == 4
    assert all(Path(d).name.startswith("lvm-") and len(Path(d).name) == 16 for d in dirs)


def test_resources_round_trip(tmp_path):
    res = expose.LVResources(method="nbdkit", loop_device="/dev/loop9", nbdkit_pid=12)
    res.save(str(tmp_path))
    assert expose.LVResources.load(str(tmp_path)) == res
    assert expose.LVResources.load(str(tmp_path / "none")) == expose.LVResources()


def test_release_of_a_missing_dir_is_a_no_op(tmp_path):
    expose.release(str(tmp_path / "gone"))
    expose.release_all(str(tmp_path / "gone"))


# --------------------------------------------------------------------------- segment plugin

EXTENTS = [
    {"start": 0, "length": 100, "path": "/a", "offset": 1000},
    {"start": 100, "length": 50, "path": "/b", "offset": 0},
    {"start": 200, "length": 100, "path": "/a", "offset": 5000},
]
STARTS = [0, 100, 200]


@pytest.mark.parametrize(
    ("offset", "length", "pieces"),
    [
        (0, 10, [(0, 10, "/a", 1000)]),
        (90, 20, [(0, 10, "/a", 1090), (10, 10, "/b", 0)]),
        (140, 70, [(0, 10, "/b", 40), (10, 50, None, 0), (60, 10, "/a", 5000)]),
        (160, 20, [(0, 20, None, 0)]),
        (
            0,
            300,
            [(0, 100, "/a", 1000), (100, 50, "/b", 0), (150, 50, None, 0), (200, 100, "/a", 5000)],
        ),
        (299, 1, [(0, 1, "/a", 5099)]),
        (300, 10, [(0, 10, None, 0)]),
    ],
)
def test_plugin_splits_requests_over_segments(offset, length, pieces):
    assert segment_plugin.resolve(EXTENTS, STARTS, offset, length) == pieces


def test_plugin_config_checks_the_map(tmp_path):
    good = tmp_path / "m.json"
    good.write_text(json.dumps({"size": 300, "extents": EXTENTS[::-1]}))
    segment_plugin.config("map", str(good))
    assert segment_plugin._map["starts"] == STARTS and not segment_plugin._map["writable"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"size": 120, "extents": EXTENTS}))
    with pytest.raises(RuntimeError, match="beyond the size"):
        segment_plugin.config("map", str(bad))
    overlap = tmp_path / "o.json"
    overlap.write_text(
        json.dumps({"size": 300, "extents": [EXTENTS[0], {**EXTENTS[1], "start": 50}]})
    )
    with pytest.raises(RuntimeError, match="overlapping"):
        segment_plugin.config("map", str(overlap))
    with pytest.raises(RuntimeError, match="unknown parameter"):
        segment_plugin.config("file", "x")


def test_plugin_reads_and_honours_read_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(range(256)) * 40)
    b.write_bytes(b"B" * 100)
    m = tmp_path / "m.json"
    extents = [{**e, "path": str(a if e["path"] == "/a" else b)} for e in EXTENTS]
    m.write_text(json.dumps({"size": 300, "extents": extents, "writable": True}))
    segment_plugin.config("map", str(m))
    h = segment_plugin.open(True)
    try:
        buf = bytearray(300)
        segment_plugin.pread(h, buf, 0, 0)
        data = a.read_bytes()
        assert buf[:100] == data[1000:1100]
        assert buf[100:150] == b"B" * 50
        assert buf[150:200] == bytes(50)
        assert buf[200:300] == data[5000:5100]
        assert not segment_plugin.can_write(h)
        with pytest.raises(OSError):
            segment_plugin.pwrite(h, b"x", 0, 0)
    finally:
        segment_plugin.close(h)
    w = segment_plugin.open(False)
    try:
        assert segment_plugin.can_write(w)
        segment_plugin.pwrite(w, b"XY", 99, 0)
        segment_plugin.flush(w, 0)
        with pytest.raises(OSError):
            segment_plugin.pwrite(w, b"z", 160, 0)  # a gap: no PV bytes behind it
    finally:
        segment_plugin.close(w)
    assert a.read_bytes()[1099:1100] == b"X" and b.read_bytes()[:1] == b"Y"
