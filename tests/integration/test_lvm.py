"""LVM in userspace on real fixtures: VG metadata read with a private lvm config, every
LV exposed (loop device or nbdkit segment mapper) and mounted read-only, reasons for
what cannot be exposed, and the host's LVM state untouched."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.images import probe_image
from vmcraft_tasks.craft.lvm import config, expose, layout, tools
from vmcraft_tasks.craft.lvm.expose import LVExposeError, PVLocation
from vmcraft_tasks.craft.nbd import helpers
from vmcraft_tasks.craft.nbd.base import AttachedDisk
from vmcraft_tasks.craft.nbd.fuse import FuseNbdBackend
from vmcraft_tasks.craft.partitions import Partition, read_partition_table
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes import rhel_lvm, rhel_lvm_twin, thin_root, two_disks
from vmcraft_tasks.samples.toolkit import BuiltImage, sha256_file

pytestmark = pytest.mark.integration

LVM_PV_TYPE = "e6d6d379-f507-44c2-a23c-238f2a3df928"


@pytest.fixture(scope="module")
def guests() -> dict[str, BuiltImage]:
    return {
        "rhel": rhel_lvm.rhel_lvm(),
        "twin": rhel_lvm_twin.rhel_lvm_twin(),
        "thin": thin_root.thin_root(),
    }


@pytest.fixture
def sources_unchanged(guests) -> Iterator[None]:
    paths = [p for built in guests.values() for p in lvmkit.disk_paths(built)]
    before = {p: sha256_file(p) for p in paths}
    yield
    assert {p: sha256_file(p) for p in paths} == before


# --------------------------------------------------------------------------- attaching


@dataclass
class AttachedVM:
    """A VM's disks attached read-only (qemu-nbd --snapshot + nbdfuse), one loop device
    per PV, as the multi-disk attach will do it."""

    disks: list[AttachedDisk]
    pv_devices: list[str]
    pv_files: dict[str, tuple[str, int]] = field(default_factory=dict)  # device -> (file, offset)
    parent: str = ""


def _pv_partitions(disk: AttachedDisk) -> list[Partition]:
    try:
        parts = read_partition_table(disk.disk_path)
    except Exception:
        parts = []
    if parts:
        return [p for p in parts if p.type.lower() == LVM_PV_TYPE]
    # No partition table: a whole-disk PV.
    size = disk.image.virtual_size
    return [Partition(0, 0, size // 512, 512, "", "none")]


@contextlib.contextmanager
def attached_vm(built: BuiltImage, work: Path, *, disks: int | None = None) -> Iterator[AttachedVM]:
    backend = FuseNbdBackend()
    vm = AttachedVM([], [], parent=str(work / f"vm-{uuid.uuid4().hex[:8]}"))
    os.makedirs(vm.parent)
    try:
        for path in lvmkit.disk_paths(built)[:disks]:
            state = os.path.join(os.environ["VMCRAFT_WORK_DIR"], f"attach-{uuid.uuid4().hex[:8]}")
            disk = backend.attach(probe_image(path), readonly=True, state_dir=state)
            vm.disks.append(disk)
            for part in _pv_partitions(disk):
                device = backend.partition_device(disk, part)
                vm.pv_devices.append(device)
                vm.pv_files[device] = (disk.disk_path, part.offset_bytes)
        yield vm
    finally:
        expose.release_all(vm.parent)
        for disk in vm.disks:
            backend.release(disk.state_dir)
        os.rmdir(vm.parent)


def read_vg(vm: AttachedVM) -> layout.VG:
    vgs = layout.parse(tools.report(vm.pv_devices))
    assert len(vgs) == 1, vgs
    return vgs[0]


@contextlib.contextmanager
def mounted_ro(device: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    commands.run(["mount", "-o", "ro,nosuid,nodev,noexec", device, str(mnt)], timeout=60)
    try:
        yield mnt
    finally:
        commands.run(["umount", str(mnt)], timeout=60)


def loop_is_readonly(device: str) -> bool:
    with open(f"/sys/block/{os.path.basename(device)}/ro") as fh:
        return fh.read().strip() == "1"


# --------------------------------------------------------------------------- tests


def test_two_guests_with_vg_rl_are_read_at_once_without_collision(
    guests, tmp_path, sources_unchanged
):
    rhel, twin = guests["rhel"], guests["twin"]
    with attached_vm(rhel, tmp_path) as a, attached_vm(twin, tmp_path) as b:
        with ThreadPoolExecutor(2) as pool:
            vg_a, vg_b = pool.map(read_vg, [a, b])
        assert vg_a.name == vg_b.name == "rl"
        assert vg_a.uuid == rhel.notes["vg"]["uuid"]
        assert vg_b.uuid == twin.notes["vg"]["uuid"]
        assert vg_a.uuid != vg_b.uuid
        # Each VM's call saw only its own devices.
        assert {pv.device for pv in vg_a.pvs} == set(a.pv_devices)
        assert {pv.device for pv in vg_b.pvs} == set(b.pv_devices)
        assert len(vg_a.pvs) == 2 and len(vg_b.pvs) == 1
        for vg, built in ((vg_a, rhel), (vg_b, twin)):
            assert [lv.name for lv in vg.lvs] == ["home", "root", "swap", "var"]
            assert all(lv.reason is None for lv in vg.lvs), [lv.reason for lv in vg.lvs]
            for lv in vg.lvs:
                assert lv.uuid == built.notes["lvs"][lv.name]["uuid"]
                assert lv.size == built.notes["lvs"][lv.name]["size"]
                assert len(lv.segments) == built.notes["lvs"][lv.name]["segments"]
        assert vg_a.lv("home").multi_segment and not vg_b.lv("home").multi_segment
        assert {s.pv_uuid for s in vg_a.lv("home").segments} == set(
            rhel.notes["vg"]["pvs"].values()
        )


def _check_guest(vm: AttachedVM, vg: layout.VG, built: BuiltImage, mnt: Path) -> dict[str, str]:
    methods = {}
    exposed = {lv.name: expose.expose(vg, lv, vm.parent) for lv in vg.lvs}
    for name, e in exposed.items():
        methods[name] = e.method
        assert e.readonly and loop_is_readonly(e.device)
        assert e.mapper_name == f"rl-{name}"
        with open(e.device, "rb") as fh:
            assert os.lseek(fh.fileno(), 0, os.SEEK_END) == vg.lv(name).size
    files = built.notes["files"]
    with mounted_ro(exposed["root"].device, mnt / "root") as root:
        assert (root / "etc/hostname").read_text() == f"{built.notes['hostname']}\n"
        assert 'ID="rocky"' in (root / "etc/os-release").read_text()
        assert "/dev/mapper/rl-var" in (root / "etc/fstab").read_text()
        assert (root / "root/marker.txt").read_text() == files["root"]["/root/marker.txt"]
        later = built.notes["later_segment_files"]["root"]
        assert sha256_file(root / later["path"].lstrip("/")) == later["sha256"]
    with mounted_ro(exposed["var"].device, mnt / "var") as var:
        assert (var / "log/messages").read_text() == files["var"]["/log/messages"]
    with mounted_ro(exposed["home"].device, mnt / "home") as home:
        assert (home / "rocky/notes.txt").read_text() == files["home"]["/rocky/notes.txt"]
        spanning = built.notes["later_segment_files"]["home"]
        assert sha256_file(home / spanning["path"].lstrip("/")) == spanning["sha256"]
    with open(exposed["swap"].device, "rb") as fh:
        assert fh.read(4096)[4086:4096] == b"SWAPSPACE2"
    for e in exposed.values():
        expose.release(e.state_dir)
        assert not os.path.exists(e.state_dir)
    return methods


def test_every_lv_of_both_guests_is_exposed_and_mounted_read_only(
    guests, tmp_path, sources_unchanged
):
    with attached_vm(guests["rhel"], tmp_path) as a, attached_vm(guests["twin"], tmp_path) as b:
        vg_a, vg_b = read_vg(a), read_vg(b)
        methods_a = _check_guest(a, vg_a, guests["rhel"], tmp_path / "a")
        methods_b = _check_guest(b, vg_b, guests["twin"], tmp_path / "b")
    # Multi-segment (root) and multi-PV (home) LVs go through nbdkit; the rest are loops.
    assert methods_a == {"root": "nbdkit", "home": "nbdkit", "var": "loop", "swap": "loop"}
    assert methods_b == {"root": "nbdkit", "home": "loop", "var": "loop", "swap": "loop"}


def test_lvs_can_be_read_straight_from_the_attached_disk_files(guests, tmp_path, sources_unchanged):
    """PVLocation(file, partition offset): no loop device stacked on the PV's loop."""
    built = guests["rhel"]
    with attached_vm(built, tmp_path) as vm:
        vg = read_vg(vm)
        where = {pv.uuid: PVLocation(*vm.pv_files[pv.device]) for pv in vg.pvs if pv.device}
        root = expose.expose(vg, vg.lv("root"), vm.parent, locations=where)
        var = expose.expose(vg, vg.lv("var"), vm.parent, locations=where)
        assert helpers.loop_backing_file(var.device) == vm.disks[0].disk_path
        with mounted_ro(root.device, tmp_path / "root") as mnt:
            later = built.notes["later_segment_files"]["root"]
            assert sha256_file(mnt / later["path"].lstrip("/")) == later["sha256"]
        with mounted_ro(var.device, tmp_path / "var") as mnt:
            assert (mnt / "log/messages").exists()


def test_a_disk_left_out_leaves_a_missing_pv_with_a_clear_reason(
    guests, tmp_path, sources_unchanged
):
    built = guests["rhel"]
    with attached_vm(built, tmp_path, disks=1) as vm:
        vg = read_vg(vm)
        pv1 = built.notes["vg"]["pvs"]["pv1"]
        assert vg.missing_pvs == (pv1,)
        home = vg.lv("home")
        assert home.reason == (
            f"VG rl: PV {pv1} is missing (a disk left out of the manifest?); "
            "LV home has a segment on it"
        )
        assert [lv.name for lv in vg.lvs if lv.exposable] == ["root", "swap", "var"]
        with pytest.raises(LVExposeError, match=f"PV {pv1} is missing"):
            expose.expose(vg, home, vm.parent)
        assert expose.state_dirs(vm.parent) == []
        root = expose.expose(vg, vg.lv("root"), vm.parent)
        with mounted_ro(root.device, tmp_path / "root") as mnt:
            assert (mnt / "etc/hostname").read_text() == "rocky-lvm01\n"


def test_a_thin_root_is_reported_with_a_reason_not_exposed(guests, tmp_path, sources_unchanged):
    with attached_vm(guests["thin"], tmp_path) as vm:
        vg = read_vg(vm)
        assert [lv.name for lv in vg.lvs] == ["pool00", "root", "swap"]
        root, pool = vg.lv("root"), vg.lv("pool00")
        assert root.segtype == "thin" and root.pool_lv == "pool00"
        assert root.reason is not None and "thin volume in pool pool00" in root.reason
        assert pool.reason is not None and "thin pool" in pool.reason
        assert {lv.name for lv in vg.internal_lvs} == {
            "lvol0_pmspare",
            "pool00_tdata",
            "pool00_tmeta",
        }
        assert all(lv.reason for lv in vg.internal_lvs)
        with pytest.raises(LVExposeError, match="thin volume"):
            expose.expose(vg, root, vm.parent)
        swap = expose.expose(vg, vg.lv("swap"), vm.parent)
        with open(swap.device, "rb") as fh:
            assert fh.read(4096)[4086:] == b"SWAPSPACE2"


def test_what_an_exposed_lv_holds_is_released_from_its_state_dir_alone(guests, tmp_path):
    """A worker killed after exposing: the next one releases by the record alone."""
    with attached_vm(guests["rhel"], tmp_path) as vm:
        vg = read_vg(vm)
        root = expose.expose(vg, vg.lv("root"), vm.parent)
        res = expose.LVResources.load(root.state_dir)
        assert res.nbdkit_pid and res.nbdfuse_pid and res.loop_device == root.device
        assert helpers.process_alive(res.nbdkit_pid)
        expose.release_all(vm.parent)  # from the directory, not the ExposedLV
        assert not helpers.process_alive(res.nbdkit_pid)
        assert not helpers.process_alive(res.nbdfuse_pid)
        assert helpers.loop_backing_file(root.device) != res.fuse_file
        assert expose.state_dirs(vm.parent) == []


def _sequential_read_s(device: str, size: int) -> float:
    started = time.monotonic()
    commands.run(
        [
            "dd",
            f"if={device}",
            "of=/dev/null",
            "bs=1M",
            f"count={size // (1 << 20)}",
            "iflag=direct",
            "status=none",
        ],
        timeout=120,
    )
    return time.monotonic() - started


def test_measured_figures(guests, tmp_path, capsys):
    """Not a benchmark gate: prints the costs the report quotes (run with -s)."""
    with attached_vm(guests["rhel"], tmp_path) as vm:
        t0 = time.monotonic()
        vg = read_vg(vm)
        read_s = time.monotonic() - t0
        t0 = time.monotonic()
        var = expose.expose(vg, vg.lv("var"), vm.parent)
        loop_s = time.monotonic() - t0
        t0 = time.monotonic()
        root = expose.expose(vg, vg.lv("root"), vm.parent)
        nbd_s = time.monotonic() - t0
        size = 100 << 20
        var_read = _sequential_read_s(var.device, size)
        root_read = _sequential_read_s(root.device, size)
    with capsys.disabled():
        print(
            f"\nlvm figures: read VG {read_s * 1000:.0f} ms; expose loop {loop_s * 1000:.1f} ms, "
            f"nbdkit {nbd_s * 1000:.0f} ms; 100 MiB O_DIRECT read: loop {var_read * 1000:.0f} ms "
            f"({100 / var_read:.0f} MiB/s), nbdkit {root_read * 1000:.0f} ms "
            f"({100 / root_read:.0f} MiB/s)"
        )
    assert read_s < 30 and nbd_s < 30


@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_an_lvm_call_opens_only_its_devices_and_nothing_of_the_hosts_lvm(guests, tmp_path):
    """strace of a real report: the admitted PV devices are the only block devices
    opened, and nothing under /etc/lvm, /run or /run/lock is opened or created."""
    with attached_vm(guests["rhel"], tmp_path) as vm:
        system_dir = tmp_path / "lvm-sys"
        system_dir.mkdir()
        for sub in ("lock", "backup", "archive", "profile"):
            (system_dir / sub).mkdir()
        (system_dir / "lvm.conf").write_text(config.lvm_conf(vm.pv_devices, str(system_dir)))
        result = commands.run(
            [
                "strace",
                "-f",
                "-e",
                "trace=open,openat,mkdir,unlink,rename,creat",
                "lvm",
                "lvs",
                "--all",
                "--reportformat",
                "json",
            ],
            env=config.lvm_env(str(system_dir)),
            timeout=60,
        )
        opened = set(
            re.findall(r'(?:open|openat|mkdir|unlink|rename|creat)\([^"]*"([^"]+)"', result.stderr)
        )
        devices = {
            p for p in opened if p.startswith("/dev/") and p not in ("/dev/null", "/dev/urandom")
        }
        devices = {p for p in devices if not os.path.isdir(p)}
        assert devices == set(vm.pv_devices)
        host = {
            p for p in opened if p.startswith(("/etc/lvm", "/run", "/var/lock", "/etc/multipath"))
        }
        assert host == set()
        assert '"lv_name":"root"' in result.stdout.replace(" ", "")


def test_two_disks_guest_without_lvm(tmp_path):
    """The plain two-disk guest: /var (by UUID) and /srv (/dev/sdb2) are on disk 2."""
    built = two_disks.two_disks()
    paths = lvmkit.disk_paths(built)
    assert len(paths) == 2
    before = [sha256_file(p) for p in paths]
    backend = FuseNbdBackend()
    state = os.path.join(os.environ["VMCRAFT_WORK_DIR"], f"attach-{uuid.uuid4().hex[:8]}")
    disk = backend.attach(probe_image(paths[1]), readonly=True, state_dir=state)
    try:
        parts = read_partition_table(disk.disk_path)
        assert [p.number for p in parts] == [1, 2]
        blkid = {
            p.number: commands.run(
                ["blkid", "-p", "-o", "value", "-s", "UUID", backend.partition_device(disk, p)]
            ).stdout.strip()
            for p in parts
        }
        assert blkid == {1: built.notes["fs_uuids"]["var"], 2: built.notes["fs_uuids"]["srv"]}
        with mounted_ro(backend.partition_device(disk, parts[1]), tmp_path / "srv") as srv:
            assert "srv on /dev/sdb2" in (srv / "www/index.html").read_text()
    finally:
        backend.release(state)
    assert "/dev/sdb2 /srv" in built.notes["fstab"]
    assert f"UUID={built.notes['fs_uuids']['var']} /var" in built.notes["fstab"]
    assert [sha256_file(p) for p in paths] == before
