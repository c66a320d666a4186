"""A VM attached by one process and used by others (as the fleet's steps do): its record,
LVs that outlive the process that exposed them, release from any of its disks, and the
scan cache holding LVM layouts keyed by every disk of the VG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmstate import MEMBER_FILE, VMRecord, boot_of, release_vm
from vmcraft_tasks.rediscache import RedisScanCache
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes import rhel_lvm
from vmcraft_tasks.samples.toolkit import BuiltImage, sha256_file

pytestmark = pytest.mark.integration

ATTACH_AND_LEAVE = """
import json, sys
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.settings import CraftSettings
paths, work = json.loads(sys.argv[1]), sys.argv[2]
vm = GuestVM(paths, settings=CraftSettings(work_dir=work)).launch()
found = vm.scan()
print(json.dumps({"parent": vm.parent, "dirs": vm.state_dirs,
                  "lvs": {lv.lv: lv.device for lv in found.lvs}}))
vm.forget()
"""


@pytest.fixture(scope="module")
def rhel() -> BuiltImage:
    return rhel_lvm.rhel_lvm()


@pytest.fixture
def disks(rhel: BuiltImage, tmp_path: Path) -> Iterator[list[str]]:
    paths = lvmkit.disk_paths(rhel)
    before = [sha256_file(p) for p in paths]
    yield paths
    assert [sha256_file(p) for p in paths] == before


def attach_elsewhere(paths: list[str], work: Path) -> dict[str, object]:
    """Attach and scan the VM in another process, which exits leaving it attached."""
    result = subprocess.run(
        [sys.executable, "-c", ATTACH_AND_LEAVE, json.dumps(paths), str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def test_a_vm_attached_by_a_process_that_exited_is_used_and_released_from_a_member(
    disks: list[str], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    left = attach_elsewhere(disks, work)
    parent = str(left["parent"])
    dirs = [str(d) for d in left["dirs"]]  # type: ignore[attr-defined]
    assert dirs[0] == parent and len(dirs) == 2
    assert boot_of(dirs[1]) == parent and os.path.exists(os.path.join(dirs[1], MEMBER_FILE))
    record = VMRecord.load(parent)
    assert record is not None and record.disks == dirs and record.scan is not None

    # The LVs outlived the process (and thread) that exposed them: nbdkit included.
    vm = GuestVM.resume(parent, settings=CraftSettings(work_dir=str(work)))
    found = vm.scan()  # from the record: nothing scanned again
    lvs = {lv.lv: lv for lv in found.lvs}
    assert {name: lv.device for name, lv in lvs.items()} == left["lvs"]
    assert lvs["home"].method == "nbdkit"
    mountpoint = vm.private_mountpoint("home")
    result = vm.mount_with_fallback(lvs["home"].volume, mountpoint)
    assert result.ok, result
    spanning = rhel_lvm.rhel_lvm().notes["later_segment_files"]["home"]
    assert sha256_file(os.path.join(mountpoint, spanning["path"].lstrip("/"))) == spanning["sha256"]
    assert GuestFS(mountpoint).exists("/rocky")
    vm.forget()

    # The reaper meets the second disk first: the whole VM goes, in order.
    release_vm(dirs[1])
    assert not any(os.path.exists(d) for d in dirs)
    release_vm(dirs[1])  # idempotent
    release_vm(parent)


def test_release_from_the_boot_disk_after_mounts_in_several_processes(
    disks: list[str], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    left = attach_elsewhere(disks, work)
    parent = str(left["parent"])
    vm = GuestVM.resume(parent, settings=CraftSettings(work_dir=str(work)))
    found = vm.scan()
    for fs in found.filesystems:
        if fs.type in ("ext4", "xfs"):
            assert vm.mount_with_fallback(
                fs.partition, vm.private_mountpoint(f"p{fs.partition}")
            ).ok
    vm.forget()
    release_vm(parent)
    assert not os.path.exists(parent)


def _lvm_runs(vm: GuestVM) -> tuple[int, int]:
    with commands.recorded() as ran:
        vm.scan()
    return ran.count("lvm"), ran.count("blkid")


def test_the_scan_cache_holds_lvm_layouts_keyed_by_every_disk_of_the_vg(
    disks: list[str], tmp_path: Path
) -> None:
    """A second attach of the same disks reads the VG layout and the LVs' filesystems
    from the cache; writing to either disk of the VG makes the entry unreachable."""
    cache = InProcessTTLCache()
    settings = CraftSettings(work_dir=str(tmp_path / "work"))

    def scan_once() -> tuple[int, int]:
        with GuestVM(disks, settings=settings, cache=cache) as vm:
            return _lvm_runs(vm)

    cold_lvm, cold_blkid = scan_once()
    assert cold_lvm == 3 and cold_blkid >= 1
    assert scan_once() == (0, 0)  # warm: partitions, blkid and LVM all from the cache
    # An edit of disk 2 (it holds a PV of VG rl) bumps its generation.
    with GuestVM(disks, settings=settings, cache=cache) as vm:
        cache.bump_generation(vm.disks[1].image.identity)
    lvm_runs, _ = scan_once()
    assert lvm_runs == 3
    assert scan_once() == (0, 0)


def test_lvm_layouts_in_redis_serve_another_process(
    disks: list[str], tmp_path: Path, redis_url: str
) -> None:
    settings = CraftSettings(work_dir=str(tmp_path / "work"))
    cache = RedisScanCache.from_url(redis_url)
    try:
        with GuestVM(disks, settings=settings, cache=cache) as vm:
            cold = _lvm_runs(vm)
            cold_lvs = [lv.to_dict() | {"device": None} for lv in vm.lvs()]
        assert cold[0] == 3
        other = RedisScanCache.from_url(redis_url)  # another worker's client
        try:
            with GuestVM(disks, settings=settings, cache=other) as vm:
                assert _lvm_runs(vm) == (0, 0)
                assert [lv.to_dict() | {"device": None} for lv in vm.lvs()] == cold_lvs
                assert all(lv.device for lv in vm.lvs())  # this attach's own devices
        finally:
            other.close()
    finally:
        cache.close()


def test_a_copy_of_the_disks_is_another_vm_to_the_cache(disks: list[str], tmp_path: Path) -> None:
    cache = InProcessTTLCache()
    settings = CraftSettings(work_dir=str(tmp_path / "work"))
    with GuestVM(disks, settings=settings, cache=cache) as vm:
        assert _lvm_runs(vm)[0] == 3
    copies = []
    for path in disks:
        copy = tmp_path / os.path.basename(path)
        shutil.copyfile(path, copy)
        copies.append(str(copy))
    with GuestVM(copies, settings=settings, cache=cache) as vm:
        assert _lvm_runs(vm)[0] == 3
