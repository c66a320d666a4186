"""A VM attached as a whole (`GuestVM`) on real fixtures: every disk, every LV of VG rl,
fstab resolved across all volumes, reasons for what cannot be exposed, nothing leaked,
the host's LVM state and the sources unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.guestvm import GuestVM, GuestVMError, VMReport
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes import rhel_lvm, rhel_lvm_twin, thin_root, two_disks
from vmcraft_tasks.samples.toolkit import BuiltImage, sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def guests() -> dict[str, BuiltImage]:
    return {
        "rhel": rhel_lvm.rhel_lvm(),
        "twin": rhel_lvm_twin.rhel_lvm_twin(),
        "thin": thin_root.thin_root(),
        "two": two_disks.two_disks(),
    }


@pytest.fixture(autouse=True)
def sources_unchanged(guests: dict[str, BuiltImage]) -> Iterator[None]:
    paths = [p for built in guests.values() for p in lvmkit.disk_paths(built)]
    before = {p: sha256_file(p) for p in paths}
    yield
    assert {p: sha256_file(p) for p in paths} == before


@pytest.fixture
def vms() -> Iterator[list[GuestVM]]:
    """Launched VMs are shut down even when a test fails half-way."""
    opened: list[GuestVM] = []
    yield opened
    for vm in opened:
        vm.shutdown()


def launched(vms: list[GuestVM], paths: list[str]) -> GuestVM:
    vm = GuestVM(paths)
    vms.append(vm)
    return vm.launch()


def by_mountpoint(report: VMReport) -> dict[str, int | None]:
    (root,) = report.roots
    return {e.entry.mountpoint: e.resolved_partition for e in root.fstab}


def check_rhel(vm: GuestVM, report: VMReport, built: BuiltImage) -> None:
    (root,) = report.roots
    assert root.distro == "rocky" and root.major == 9
    assert root.hostname == built.notes["hostname"]
    table = vm.volumes()
    lvs = {lv.lv: lv for lv in report.lvs}
    assert sorted(lvs) == ["home", "root", "swap", "var"]
    assert all(lv.vg == "rl" and lv.reason is None for lv in lvs.values())
    assert lvs["root"].method == "nbdkit"  # two segments
    assert root.root_partition == lvs["root"].volume
    fs = {f.partition: f for f in report.filesystems}
    assert fs[lvs["var"].volume].type == "xfs"
    assert fs[lvs["swap"].volume].type == "swap"
    for name in ("root", "var", "home"):
        assert report.mounts[lvs[name].volume].ok, report.mounts[lvs[name].volume]
    assert lvs["swap"].volume not in report.mounts  # swap: reported, not mounted
    # Every device entry of the fstab resolves to a volume of this VM.
    resolved = by_mountpoint(report)
    assert resolved["/"] == lvs["root"].volume
    assert resolved["/var"] == lvs["var"].volume
    assert resolved["/home"] == lvs["home"].volume
    assert resolved["none"] == lvs["swap"].volume
    boot = resolved["/boot"]
    assert boot is not None and fs[boot].uuid == built.notes["fs_uuids"]["boot"]
    assert report.mounts[boot].ok
    volume = table.get(boot)
    assert volume is not None and volume.label == "partition 2"
    # Guest data through the mounts, including later segments.
    files = built.notes["files"]
    home = GuestFS(report.mounts[lvs["home"].volume].mountpoint)
    assert home.cat("/rocky/notes.txt") == files["home"]["/rocky/notes.txt"]
    spanning = built.notes["later_segment_files"]["home"]
    path = os.path.join(home.root, spanning["path"].lstrip("/"))
    assert sha256_file(path) == spanning["sha256"]


def test_rhel_lvm_two_disks_inspected_as_one_vm(guests, vms):
    built = guests["rhel"]
    vm = launched(vms, lvmkit.disk_paths(built))
    report = vm.inspect()
    check_rhel(vm, report, built)
    lvs = {lv.lv: lv for lv in report.lvs}
    assert lvs["home"].method == "nbdkit"  # spans both disks
    assert [d["disk"] for d in report.disks] == [1, 2]
    assert report.disks[1]["partitions"] == []  # disk 2 is a whole-disk PV
    labels = {v["number"]: v["label"] for v in report.volumes}
    assert labels[1000] == "disk 2 (whole disk)"
    assert labels[lvs["home"].volume] == "LV rl/home"
    assert vm.lv_reasons() == {}
    json.dumps(report.to_dict())  # the report is JSON
    # Every exposed LV lives under the boot disk's attach state; shutdown removes it.
    parent = vm.parent
    assert all(lv.device for lv in report.lvs)
    vm.shutdown()
    vm.shutdown()  # safe twice
    assert not os.path.exists(parent)


def test_two_vgs_named_rl_are_inspected_at_once(guests, vms):
    rhel, twin = guests["rhel"], guests["twin"]
    a = launched(vms, lvmkit.disk_paths(rhel))
    b = launched(vms, lvmkit.disk_paths(twin))
    with ThreadPoolExecutor(2) as pool:
        report_a, report_b = pool.map(lambda vm: vm.inspect(), [a, b])
    check_rhel(a, report_a, rhel)
    check_rhel(b, report_b, twin)
    assert {lv.vg_uuid for lv in report_a.lvs} == {rhel.notes["vg"]["uuid"]}
    assert {lv.vg_uuid for lv in report_b.lvs} == {twin.notes["vg"]["uuid"]}
    devices_a = {lv.device for lv in report_a.lvs}
    devices_b = {lv.device for lv in report_b.lvs}
    assert not devices_a & devices_b


def test_a_disk_left_out_gives_home_the_missing_pv_reason(guests, vms):
    built = guests["rhel"]
    vm = launched(vms, lvmkit.disk_paths(built)[:1])
    report = vm.inspect()
    pv1 = built.notes["vg"]["pvs"]["pv1"]
    reasons = vm.lv_reasons()
    assert list(reasons) == ["rl/home"]
    assert f"PV {pv1} is missing" in reasons["rl/home"]
    assert any(f"PV {pv1} is missing" in note for note in report.notes)
    (root,) = report.roots
    assert root.hostname == built.notes["hostname"]
    lvs = {lv.lv: lv for lv in report.lvs}
    assert lvs["home"].device is None and lvs["home"].volume not in report.mounts
    for name in ("root", "var"):
        assert report.mounts[lvs[name].volume].ok


def test_a_thin_root_has_a_reason_and_no_root_is_found(guests, vms):
    vm = launched(vms, lvmkit.disk_paths(guests["thin"]))
    report = vm.inspect()
    assert report.roots == []
    reasons = vm.lv_reasons()
    assert "thin volume in pool pool00" in reasons["rl/root"]
    assert "thin pool" in reasons["rl/pool00"]
    (said,) = [n for n in report.notes if n.startswith("no operating system root")]
    assert "rl/root" in said and "thin" in said
    lvs = {lv.lv: lv for lv in report.lvs}
    assert lvs["swap"].method == "loop"


def test_two_disks_without_lvm_resolve_var_and_srv_to_disk_2(guests, vms):
    built = guests["two"]
    vm = launched(vms, lvmkit.disk_paths(built))
    report = vm.inspect()
    resolved = by_mountpoint(report)  # exactly one root
    table = vm.volumes()
    var, srv = table.get(resolved["/var"] or -1), table.get(resolved["/srv"] or -1)
    assert var is not None and (var.disk, var.partition) == (1, 1)
    assert srv is not None and (srv.disk, srv.partition) == (1, 2)
    assert srv.label == "disk 2 partition 2"
    assert report.mounts[srv.number].ok and report.mounts[var.number].ok
    srv_fs = GuestFS(report.mounts[srv.number].mountpoint)
    assert "srv on /dev/sdb2" in srv_fs.cat("/www/index.html")
    assert vm.device(srv.number).startswith("/dev/loop")
    assert report.lvs == []


def test_a_disk_that_cannot_attach_releases_the_others(guests, tmp_path):
    missing = str(tmp_path / "no-such-disk.raw")
    vm = GuestVM([lvmkit.disk_paths(guests["two"])[0], missing])
    with pytest.raises(GuestVMError) as info:
        vm.launch()
    assert info.value.disk == 2 and info.value.path == missing
    assert "disk 2" in str(info.value)
    vm.shutdown()  # nothing attached: a no-op


def test_cli_inspects_several_images_as_one_vm(guests):
    paths = lvmkit.disk_paths(guests["rhel"])
    result = subprocess.run(
        [sys.executable, "-m", "vmcraft_tasks.craft.cli", "inspect", "--json", *paths],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [d["path"] for d in data["disks"]] == paths
    (root,) = data["roots"]
    assert root["hostname"] == guests["rhel"].notes["hostname"]
    text = subprocess.run(
        [sys.executable, "-m", "vmcraft_tasks.craft.cli", "inspect", *paths],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    assert "root on LV rl/root" in text.stdout and "disk 2" in text.stdout
