"""LVM and multi-disk VMs through the fleet: all of a VM's disks converted and attached on
one host under one lease, its LVs exposed without device-mapper, every filesystem of
every disk and LV mounted by the chord, fstab resolved across them, fixes applied on
whichever disk holds the file, reports listing each disk and LV; two VGs named `rl` on
one host at once; the host's LVM state and the sources unchanged."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import yaml

from scheduler.batch import batch_status, submit_batch
from scheduler.submit import FleetClient
from tests.lvmhost import host_lvm_unchanged  # noqa: F401 (autouse)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes import rhel_lvm, rhel_lvm_twin, thin_root, two_disks
from vmcraft_tasks.samples.toolkit import BuiltImage, sha256_file


@pytest.fixture(scope="module")
def fleet(fleet_factory):
    # One host, two VMs at a time: both `rl` guests are attached there together.
    return fleet_factory(["h1"], concurrency=2)


@pytest.fixture
def client(fleet):
    c = FleetClient(fleet.settings())
    yield c
    c.close()


@pytest.fixture(scope="module")
def guests() -> dict[str, BuiltImage]:
    return {
        "rhel": rhel_lvm.rhel_lvm(),
        "twin": rhel_lvm_twin.rhel_lvm_twin(),
        "thin": thin_root.thin_root(),
        "two": two_disks.two_disks(),
    }


@pytest.fixture(autouse=True)
def sources_unchanged(guests: dict[str, BuiltImage]):
    paths = [p for built in guests.values() for p in lvmkit.disk_paths(built)]
    before = {p: sha256_file(p) for p in paths}
    yield
    assert {p: sha256_file(p) for p in paths} == before


def submit(client, tmp_path, batch: str, vms: list[dict[str, Any]]) -> str:
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({"batch": batch, "vms": vms}))
    return submit_batch(client, str(path))


def wait_finished(client, batch: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while True:
        status = batch_status(client, batch)
        if status.finished:
            return status
        assert time.monotonic() < deadline, status.to_dict()
        time.sleep(0.3)


def lv_volumes(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {lv["lv"]: lv for lv in report["lvs"]}


def resolved(report: dict[str, Any]) -> dict[str, int | None]:
    (root,) = report["os"]
    return {e["mountpoint"]: e["resolved_partition"] for e in root["fstab"]}


def check_rocky_lvm(report: dict[str, Any], built: BuiltImage) -> None:
    assert report["status"] == "done", report["error"]
    (root,) = report["os"]
    assert (root["distro"], root["hostname"]) == ("rocky", built.notes["hostname"])
    lvs = lv_volumes(report)
    assert sorted(lvs) == ["home", "root", "swap", "var"]
    assert all(lv["reason"] is None and lv["device"] for lv in lvs.values()), lvs
    assert {lv["vg_uuid"] for lv in lvs.values()} == {built.notes["vg"]["uuid"]}
    assert lvs["root"]["method"] == "nbdkit"  # two segments
    # Every filesystem of every LV was mounted by its own chord subtask.
    for name in ("root", "var", "home"):
        mount = report["mounts"][str(lvs[name]["volume"])]
        assert mount["ok"], mount
    assert root["root_partition"] == lvs["root"]["volume"]
    where = resolved(report)
    assert where["/"] == lvs["root"]["volume"]
    assert where["/var"] == lvs["var"]["volume"]
    assert where["/home"] == lvs["home"]["volume"]
    fs = {f["partition"]: f for f in report["filesystems"]}
    assert fs[lvs["var"]["volume"]]["type"] == "xfs"
    assert fs[where["/boot"]]["uuid"] == built.notes["fs_uuids"]["boot"]


def test_lvm_and_multi_disk_guests_in_one_batch(client, tmp_path, guests, fleet):
    """Dry runs (the Rocky samples carry dummy kernels: a real run fails them at the
    initramfs rebuild, which `test_fixes_land_on_the_disk_that_holds_the_file` shows)."""
    vms = [
        {"id": vm, "disks": lvmkit.disk_paths(guests[vm]), "options": {"dry_run": True}}
        for vm in ("rhel", "twin", "two", "thin")
    ]
    batch = submit(client, tmp_path, "lvm", vms)
    status = wait_finished(client, batch)
    states = {vm.vm_id: (vm.status, vm.error) for vm in status.vms}
    assert {vm: s for vm, (s, _) in states.items()} == {
        "rhel": "done",
        "twin": "done",
        "two": "done",
        "thin": "failed",
    }, states
    out = tmp_path / "lvm"
    reports = {vm: json.loads((out / f"{vm}.json").read_text()) for vm in states}

    # Both guests with a VG named rl, on the same host, each with its own VG.
    rhel, twin = reports["rhel"], reports["twin"]
    check_rocky_lvm(rhel, guests["rhel"])
    check_rocky_lvm(twin, guests["twin"])
    assert rhel["host"] == twin["host"] == "h1"
    # home spans disk 1's PV and disk 2's whole-disk PV: both disks are in the report.
    assert lv_volumes(rhel)["home"]["method"] == "nbdkit"
    assert [d["partitions"] is not None for d in rhel["disks"]] == [True, True]
    assert rhel["disks"][1]["partitions"] == []  # a whole-disk PV
    assert len(rhel["disks"][0]["partitions"]) == 3
    labels = {v["number"]: v["label"] for v in rhel["volumes"]}
    assert labels[lv_volumes(rhel)["home"]["volume"]] == "LV rl/home"

    # Two plain disks: /var by UUID and /srv named /dev/sdb2, both on disk 2.
    two = reports["two"]
    where = resolved(two)
    assert (where["/var"], where["/srv"]) == (1001, 1002)
    assert two["mounts"]["1001"]["ok"] and two["mounts"]["1002"]["ok"]
    assert [len(d["partitions"]) for d in two["disks"]] == [3, 2]
    fstab = next(f for f in two["fixes"] if f["target"] == "/etc/fstab")
    assert fstab["applied"] is False  # a dry run
    srv_uuid = next(f["uuid"] for f in two["filesystems"] if f["partition"] == 1002)
    assert "/dev/sdb2" not in fstab["after"] and f"UUID={srv_uuid}" in fstab["after"]

    # A thin-pool root: the VM fails, naming the LV and why.
    reason = states["thin"][1]
    assert "rl/root" in reason and "thin" in reason, reason
    assert "no operating system root found" in reason

    # Every disk of every VM was converted; the summary counts the LVs.
    for vm in ("rhel", "twin", "two"):
        targets = [d["target"] for d in reports[vm]["disks"]]
        assert len(targets) == len(lvmkit.disk_paths(guests[vm]))
        assert all(os.path.exists(t) for t in targets)
    # The VM that ends the batch writes the summary just after its own end.
    deadline = time.monotonic() + 30
    while not (out / "summary.md").exists():
        assert time.monotonic() < deadline, "no batch summary"
        time.sleep(0.2)
    markdown = (out / "summary.md").read_text()
    assert "4 LVs" in markdown


def test_fixes_land_on_the_disk_that_holds_the_file(client, tmp_path, guests, fleet):
    """A real run of the two-disk guest: fstab's /dev/sdb2 becomes the UUID of disk 2's
    partition 2 on the converted copy. The Rocky sample has a dummy kernel and no
    dracut, so the VM then fails at the initramfs rebuild, with that reason."""
    built = guests["two"]
    batch = submit(client, tmp_path, "two", [{"id": "two", "disks": lvmkit.disk_paths(built)}])
    (vm,) = wait_finished(client, batch).vms
    assert vm.status == "failed" and "initramfs" in (vm.error or ""), vm.error
    report = json.loads((tmp_path / "two" / "two.json").read_text())
    targets = [d["target"] for d in report["disks"]]
    with GuestVM(targets) as guest:
        found = guest.inspect()
        (root,) = found.roots
        srv = next(f for f in found.filesystems if f.partition == 1002)
        fstab = GuestFS(found.mounts[root.root_partition].mountpoint).cat("/etc/fstab")
    assert "/dev/sdb2" not in fstab and f"UUID={srv.uuid}" in fstab
