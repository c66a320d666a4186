"""The ten-LV Rocky guest (`ten_lvs`) inspected as a VM: every LV exposed (eight loop
devices, two nbdkit segment mappers) and mounted with /boot, the data of the later
segments readable, the OS root and its fstab resolved, nothing left behind."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests import leaks
from tests.integration import test_guestvm
from tests.integration.test_guestvm import by_mountpoint, launched
from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.lvm import expose
from vmcraft_tasks.craft.nbd import helpers
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes import ten_lvs
from vmcraft_tasks.samples.toolkit import BuiltImage, sha256_file

pytestmark = pytest.mark.integration

MULTI_SEGMENT = {"root", "home"}

vms = test_guestvm.vms  # the fixture: launched VMs are shut down even if a test fails


@pytest.fixture(scope="module")
def built() -> BuiltImage:
    return ten_lvs.ten_lvs()


@pytest.fixture(autouse=True)
def sources_unchanged(built: BuiltImage) -> Iterator[None]:
    paths = lvmkit.disk_paths(built)
    before = {p: sha256_file(p) for p in paths}
    yield
    assert {p: sha256_file(p) for p in paths} == before


def helper_pids(vm: GuestVM) -> list[int]:
    """The nbdkit and nbdfuse processes the VM's LVs hold, from their state records."""
    pids = []
    for state_dir in expose.state_dirs(vm.parent):
        res = expose.LVResources.load(state_dir)
        pids += [pid for pid in (res.nbdkit_pid, res.nbdfuse_pid) if pid]
    return pids


def test_ten_lvs_are_exposed_mounted_and_resolved(built, vms):
    before = leaks.snapshot()
    vm = launched(vms, lvmkit.disk_paths(built))
    report = vm.inspect()
    notes = built.notes

    lvs = {lv.lv: lv for lv in report.lvs}
    assert sorted(lvs) == sorted(notes["lvs"])
    assert len(lvs) == 10 and vm.lv_reasons() == {}
    for name, lv in lvs.items():
        assert lv.vg == "rl" and lv.vg_uuid == notes["vg"]["uuid"]
        assert lv.size == notes["lvs"][name]["size"]
        assert lv.method == ("nbdkit" if name in MULTI_SEGMENT else "loop"), name
        assert notes["lvs"][name]["segments"] == (2 if name in MULTI_SEGMENT else 1)

    # All ten filesystems found with their types and uuids, and mounted with /boot.
    fs = {f.partition: f for f in report.filesystems}
    for name, lv in lvs.items():
        assert fs[lv.volume].type == notes["lvs"][name]["fstype"], name
        assert fs[lv.volume].uuid == notes["fs_uuids"][name], name
        assert report.mounts[lv.volume].ok, report.mounts[lv.volume]
    assert sorted(n for n, m in report.mounts.items() if m.ok) == sorted(
        [2, *(lv.volume for lv in lvs.values())]
    )

    # The OS root, and every fstab entry resolved to its LV (or /boot to partition 2).
    (root,) = report.roots
    assert root.distro == "rocky" and root.major == 9
    assert root.hostname == notes["hostname"] == "rocky-tenlv05"
    assert root.root_partition == lvs["root"].volume
    resolved = by_mountpoint(report)
    assert resolved == {
        **{notes["lvs"][name]["mountpoint"]: lv.volume for name, lv in lvs.items()},
        "/boot": 2,
    }

    # Guest data through the mounts: every text file of every LV, the later segments.
    mounted = {name: GuestFS(report.mounts[lv.volume].mountpoint) for name, lv in lvs.items()}
    mounted["boot"] = GuestFS(report.mounts[2].mountpoint)
    for name, files in notes["files"].items():
        for path, content in files.items():
            assert mounted[name].cat(path) == content, (name, path)
    for name, later in notes["later_segment_files"].items():
        assert later["blocks_in_later"] > 0
        path = os.path.join(mounted[name].root, later["path"].lstrip("/"))
        assert sha256_file(path) == later["sha256"], name
    var_data = notes["var_data"]
    path = os.path.join(mounted["var"].root, var_data["path"].lstrip("/"))
    assert sha256_file(path) == var_data["sha256"]
    json.dumps(report.to_dict())

    # Shutdown releases everything: helpers, loop devices, mounts, the LVs' state.
    pids = helper_pids(vm)
    assert len(pids) == 2 * len(MULTI_SEGMENT)
    assert all(helpers.process_alive(pid) for pid in pids)
    parent = vm.parent
    vm.shutdown()
    assert not os.path.exists(parent)
    deadline = time.monotonic() + 2.0  # daemonised FUSE drivers exit just after unmount
    while True:
        alive = [pid for pid in pids if helpers.process_alive(pid)]
        left = leaks.snapshot().new_since(before)
        if not (alive or left) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert alive == [] and left == []
