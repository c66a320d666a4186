"""The offline fixes on real multi-disk guests, attached writable as one VM (copies of
the samples): /dev/sdb2 in fstab becomes the UUID of disk 2's partition 2, LVM names
are kept, and the kernel command lines' LVM names are checked against the VM's LVs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft.fixes.devicenames import device_name_uses
from vmcraft_tasks.craft.fixes.distros import apply_fixes
from vmcraft_tasks.craft.fixes.lvmboot import check_lvm_boot, read_boot_config
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.guestvm import GuestVM, VMScan
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.samples import SAMPLES, lvmkit
from vmcraft_tasks.samples.toolkit import BuiltImage, sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def guests() -> dict[str, BuiltImage]:
    return {name: SAMPLES[name]() for name in ("two_disks", "rhel_lvm")}


@pytest.fixture(autouse=True)
def sources_unchanged(guests: dict[str, BuiltImage]) -> Iterator[None]:
    """The cached samples are never written: the tests fix copies."""
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


def copied(built: BuiltImage, folder: Path) -> list[str]:
    folder.mkdir()
    paths = []
    for path in lvmkit.disk_paths(built):
        target = str(folder / os.path.basename(path))
        subprocess.run(["cp", "--sparse=always", path, target], check=True)
        paths.append(target)
    return paths


def launched(vms: list[GuestVM], paths: list[str], *, readonly: bool) -> GuestVM:
    vm = GuestVM(paths, readonly=readonly)
    vms.append(vm)
    return vm.launch()


def mounted_tree(vm: GuestVM, found: VMScan, root: int) -> str:
    """The guest's root volume with /boot (disk 1 partition 2) inside it."""
    boot = found.volumes.on_disk(0, 2)
    assert boot is not None
    tree = vm.private_mountpoint("root")
    result = vm.mount_with_fallback(root, tree)
    assert result.ok, result
    result = vm.mount_with_fallback(boot.number, os.path.join(tree, "boot"))
    assert result.ok, result
    return tree


def rocky(root: int) -> OSInfo:
    return OSInfo(root_partition=root, type="linux", distro="rocky", major=9, arch="x86_64")


def test_sdb2_on_disk_2_becomes_its_uuid(guests, vms, tmp_path):
    built = guests["two_disks"]
    paths = copied(built, tmp_path / "two")
    vm = launched(vms, paths, readonly=False)
    found = vm.scan()
    table = found.volumes
    root, srv = table.on_disk(0, 3), table.on_disk(1, 2)
    assert root is not None and srv is not None and srv.label == "disk 2 partition 2"
    srv_uuid = built.notes["fs_uuids"]["srv"]
    assert [fs.uuid for fs in found.filesystems if fs.partition == srv.number] == [srv_uuid]
    tree = mounted_tree(vm, found, root.number)
    fs = GuestFS(tree)
    assert "/dev/sdb2 /srv ext4 defaults 1 2" in fs.cat("/etc/fstab").splitlines()

    report = apply_fixes(
        fs, rocky(root.number), found.filesystems, found.partitions, dry_run=False, volumes=table
    )
    assert report.failed == ()
    assert [s for s in report.skipped if s.name == "fstab"] == []
    (record,) = [r for r in report.applied if r.name == "fstab"]
    assert record.changed
    assert [c.reason for c in record.changes] == [
        "/dev/sdb2 is disk 2 partition 2; its name changes on KVM"
    ]
    fstab = fs.cat("/etc/fstab")
    assert fstab == built.notes["fstab"].replace("/dev/sdb2 ", f"UUID={srv_uuid} ")
    assert device_name_uses(fs, table) == []
    vm.shutdown()

    # On the disk: the VM inspected afresh resolves /srv by that UUID.
    again = launched(vms, paths, readonly=True)
    (os_root,) = again.inspect().roots
    srv_entry = {e.entry.mountpoint: e for e in os_root.fstab}["/srv"]
    assert (srv_entry.how, srv_entry.resolved_partition) == ("uuid", srv.number)


def test_lvm_names_are_kept_and_the_cmdline_checked(guests, vms, tmp_path):
    built = guests["rhel_lvm"]
    paths = copied(built, tmp_path / "rhel")
    vm = launched(vms, paths, readonly=False)
    found = vm.scan()
    table = found.volumes
    (root,) = table.lvs_named("rl", "root")
    tree = mounted_tree(vm, found, root.number)
    fs = GuestFS(tree)

    report = apply_fixes(
        fs, rocky(root.number), found.filesystems, found.partitions, dry_run=False, volumes=table
    )
    assert report.failed == ()
    assert [s for s in report.skipped if s.name == "fstab"] == []
    # /dev/mapper/rl-* (and the UUID= /boot) are stable names: nothing to change.
    assert fs.cat("/etc/fstab") == built.notes["fstab"]
    assert device_name_uses(fs, table) == []

    config = read_boot_config(fs)
    entries = [c for c in config.cmdlines if c.path.startswith("/boot/loader/entries/")]
    (entry,) = entries
    assert entry.args == built.notes["cmdline"]
    assert "rd.lvm.lv=rl/root rd.lvm.lv=rl/swap" in entry.args
    findings = check_lvm_boot(
        config.cmdlines, found.lvs, root_lv=("rl", "root"), dm_names=config.dm_names
    )
    assert [f for f in findings if f.fatal] == []

    # The same guest naming an LV this VM does not have would not boot.
    fs.write_file(
        entry.path, fs.read_file(entry.path).replace(b"rl/swap", b"rl/swap rd.lvm.lv=rl/nosuch")
    )
    config = read_boot_config(fs)
    findings = check_lvm_boot(
        config.cmdlines, found.lvs, root_lv=("rl", "root"), dm_names=config.dm_names
    )
    (fatal,) = [f for f in findings if f.fatal]
    assert (fatal.path, fatal.argument) == (entry.path, "rd.lvm.lv=rl/nosuch")
    assert fatal.problem.startswith(
        "the VM's VG rl has no LV nosuch (its LVs: home, root, swap, var)"
    )
