"""Batches end to end: real workers, real Redis, real images converted, fixed and reported."""

from __future__ import annotations

import io
import itertools
import json
import os
import time

import pytest
import yaml

from scheduler.batch import batch_status, cancel_batch, resume_batch, submit_batch
from scheduler.submit import FleetClient
from scheduler.watch import watch_batch
from vmcraft_tasks import keys
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.toolkit import sha256_file


@pytest.fixture(scope="module")
def fleet(fleet_factory):
    return fleet_factory(["h1", "h2"], concurrency=2)


@pytest.fixture
def client(fleet):
    c = FleetClient(fleet.settings())
    yield c
    c.close()


def write_manifest(directory, data) -> str:
    path = os.path.join(directory, "batch.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh)
    return path


def wait_finished(client, batch, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while True:
        status = batch_status(client, batch)
        if status.finished:
            return status
        assert time.monotonic() < deadline, status.to_dict()
        time.sleep(0.2)


def test_mixed_batch_converts_fixes_reports_and_keeps_sources(
    client,
    tmp_path,
    bootable_bios,
    dirty_ext4_raw,
    dirty_xfs_raw,
    windows_ntfs_raw,
    mbr_logical_raw,
    corrupt_vmdk,
):
    """`done` only where it is true: a real guest fixed and rebuilt, a declared data
    disk, Windows in compatibility mode; everything else fails with its reason."""
    sources = {
        "web01": bootable_bios.path,
        "data02": dirty_ext4_raw.path,
        "xfs03": dirty_xfs_raw.path,
        "win04": windows_ntfs_raw.path,
        "db05": mbr_logical_raw.path,
        "bad06": corrupt_vmdk,
        "gone07": str(tmp_path / "nowhere" / "gone07.vmdk"),
    }
    sums = {vm: sha256_file(p) for vm, p in sources.items() if os.path.exists(p)}
    vms: list[dict[str, object]] = [{"id": vm, "disks": [path]} for vm, path in sources.items()]
    vms[1]["options"] = {"os": "none"}
    manifest = write_manifest(tmp_path, {"batch": "mixed", "vms": vms})
    batch = submit_batch(client, manifest)
    status = wait_finished(client, batch, timeout_s=600)
    states = {vm.vm_id: (vm.status, vm.error) for vm in status.vms}
    assert {vm for vm, (s, _) in states.items() if s == "done"} == {"web01", "data02", "win04"}, (
        states
    )
    assert states["xfs03"] == (
        "failed",
        "no operating system found on the boot disk xfs03-disk0.qcow2 (partition 1: xfs); "
        "declare options.os: none for a data-only VM",
    )
    # A guest tree without a kernel (the Rocky sample) is known not to boot.
    assert states["db05"][0] == "failed" and "no bootable kernel" in states["db05"][1], states
    assert states["bad06"][0] == "failed" and "not a readable disk image" in states["bad06"][1]
    assert states["gone07"][0] == "failed" and "no such file" in states["gone07"][1]

    # Sources are byte-identical.
    assert {vm: sha256_file(p) for vm, p in sources.items() if vm in sums} == sums

    out = tmp_path / "mixed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["by_status"] == {"done": 3, "failed": 4}
    markdown = (out / "summary.md").read_text()
    assert "| web01 | done |" in markdown and "| data02 | done | " in markdown
    assert "data-only" in markdown and "sata/e1000e (compatibility)" in markdown

    # The converted Debian disk was fixed: fstab names no /dev/sdX, the report says how,
    # and its initramfs was rebuilt in the sandbox and verified.
    report = json.loads((out / "web01.json").read_text())
    fstab_fixes = [f for f in report["fixes"] if f["name"] == "fstab"]
    assert fstab_fixes and all(f["applied"] for f in fstab_fixes)
    (kernel,) = report["initramfs"]["kernels"]
    assert kernel["verified"] and kernel["action"] == "rebuilt"
    assert report["guestcaps"]["block_bus"] == "virtio"
    target = report["disks"][0]["target"]
    assert target.endswith(".qcow2") and os.path.exists(target)
    with VMCraft(target) as g:
        (root,) = g.inspect_os()
        fstab = g.guest(root).cat("/etc/fstab")
    assert "/dev/sda" not in fstab
    assert f"UUID={bootable_bios.notes.root_uuid}" in fstab

    # Domain XML for every VM that boots, valid against libvirt's schema; none for data.
    for vm in ("web01", "win04"):
        commands.run(["virt-xml-validate", str(out / f"{vm}.xml"), "domain"], timeout=60)
    assert not (out / "data02.xml").exists()
    data = json.loads((out / "data02.json").read_text())
    assert data["data_only"] is True and data["libvirt_xml"] is None
    # Windows gets no Linux fixes; without virtio drivers it gets devices it can boot.
    win = json.loads((out / "win04.json").read_text())
    assert win["fixes"] == [] and win["os"][0]["type"] == "windows"
    assert (win["guestcaps"]["block_bus"], win["guestcaps"]["net_model"]) == ("sata", "e1000e")
    assert 'bus="sata"' in (out / "win04.xml").read_text()


def test_priority_orders_vms_and_the_batch_limit_holds(client, tmp_path, linux_gpt_raw, fleet):
    vms = [
        {"id": f"vm{i}", "disks": [linux_gpt_raw.path], "options": {"priority": p, "os": "none"}}
        for i, p in enumerate([1, 5, 3])
    ]
    manifest = write_manifest(
        tmp_path, {"batch": "ordered", "limits": {"max_parallel": 1}, "vms": vms}
    )
    batch = submit_batch(client, manifest)
    status = wait_finished(client, batch)
    assert {vm.status for vm in status.vms} == {"done"}
    started = {
        vm.vm_id: client.jobs.get(f"ordered.{vm.vm_id}").timestamps["converting"]
        for vm in status.vms
    }
    assert sorted(started, key=lambda vm: started[vm]) == ["vm1", "vm2", "vm0"]
    ended = {
        vm.vm_id: client.jobs.get(f"ordered.{vm.vm_id}").timestamps["done"] for vm in status.vms
    }
    # max_parallel 1: each VM started after the previous one finished.
    order = sorted(started, key=lambda vm: started[vm])
    for earlier, later in itertools.pairwise(order):
        assert started[later] >= ended[earlier]


def test_max_per_host_holds_a_host_to_that_many_vms_of_the_batch(client, tmp_path, linux_gpt_raw):
    """h1 could run two VMs at once (concurrency 2, two slots); the batch allows one."""
    vms = [
        {"id": f"m{i}", "disks": [linux_gpt_raw.path], "options": {"host": "h1", "os": "none"}}
        for i in range(4)
    ]
    manifest = write_manifest(
        tmp_path, {"batch": "perhost", "limits": {"max_per_host": 1}, "vms": vms}
    )
    batch = submit_batch(client, manifest)
    status = wait_finished(client, batch)
    assert {(vm.status, vm.host) for vm in status.vms} == {("done", "h1")}
    spans = sorted(
        (record.timestamps["converting"], record.timestamps["done"])
        for record in (client.jobs.get(f"perhost.{vm.vm_id}") for vm in status.vms)
    )
    for (_, earlier_end), (later_start, _) in itertools.pairwise(spans):
        assert later_start >= earlier_end, spans
    # A VM that found the host's place taken waited (a retry), it did not fail.
    retried = [
        s
        for vm in status.vms
        for s in client.jobs.steps(f"perhost.{vm.vm_id}")
        if s["outcome"] == "retry"
    ]
    assert retried, "no VM ever waited for the host's place: the limit was not exercised"
    # Every place was given back: nothing of the batch is held on h1.
    assert client.state.smembers(keys.batch_host_key("perhost", "h1")) == set()


def test_cancel_then_resume_runs_only_what_did_not_finish(client, tmp_path, twenty_parts_raw):
    vms = [
        {"id": f"c{i}", "disks": [twenty_parts_raw.path], "options": {"os": "none"}}
        for i in range(4)
    ]
    manifest = write_manifest(
        tmp_path, {"batch": "cancelme", "limits": {"max_parallel": 1}, "vms": vms}
    )
    batch = submit_batch(client, manifest)
    deadline = time.monotonic() + 60
    while batch_status(client, batch).counts.get("done", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = cancel_batch(client, batch)
    status = wait_finished(client, batch)
    done_before = {vm.vm_id for vm in status.vms if vm.status == "done"}
    assert set(cancelled) and set(cancelled).isdisjoint(done_before)
    assert {vm.status for vm in status.vms} <= {"done", "cancelled"}

    again = resume_batch(client, batch)
    assert set(again) == {vm.vm_id for vm in status.vms if vm.status != "done"}
    final = wait_finished(client, batch)
    assert {vm.status for vm in final.vms} == {"done"}
    # Finished VMs were not run again.
    for vm_id in done_before:
        steps = client.jobs.steps(f"cancelme.{vm_id}")
        assert [s["task"] for s in steps].count("vmcraft.vm.convert") == 1


def test_watch_ends_with_the_batch(client, tmp_path, mbr_logical_raw, capsys):
    manifest = write_manifest(
        tmp_path,
        {
            "batch": "watched",
            "vms": [{"id": "w1", "disks": [mbr_logical_raw.path], "options": {"os": "none"}}],
        },
    )
    batch = submit_batch(client, manifest)
    out = io.StringIO()
    status = watch_batch(client, batch, out=out, interval_s=0.1, timeout_s=120)
    assert status.finished
    text = out.getvalue()
    assert "batch watched [" in text and "100.0%" in text


def test_pinned_vms_run_only_on_their_host_and_groups_within_the_group(
    client, tmp_path, mbr_logical_raw
):
    vms = [
        {"id": "pin1", "disks": [mbr_logical_raw.path], "options": {"host": "h2", "os": "none"}},
        {"id": "pin2", "disks": [mbr_logical_raw.path], "options": {"host": "h2", "os": "none"}},
        {
            "id": "grp3",
            "disks": [mbr_logical_raw.path],
            "options": {"host_group": ["h1"], "os": "none"},
        },
    ]
    batch = submit_batch(client, write_manifest(tmp_path, {"batch": "pinned", "vms": vms}))
    status = wait_finished(client, batch)
    hosts = {vm.vm_id: (vm.status, vm.host) for vm in status.vms}
    assert hosts == {"pin1": ("done", "h2"), "pin2": ("done", "h2"), "grp3": ("done", "h1")}
    for vm_id, (_status, host) in hosts.items():
        ran = {s["host"] for s in client.jobs.steps(f"pinned.{vm_id}") if s["outcome"] != "retry"}
        assert ran == {host}


def test_dry_run_reports_fixes_and_writes_nothing_to_the_guest(client, tmp_path, linux_gpt_raw):
    vms = [{"id": "dry1", "disks": [linux_gpt_raw.path], "options": {"dry_run": True}}]
    batch = submit_batch(client, write_manifest(tmp_path, {"batch": "dry", "vms": vms}))
    (vm,) = wait_finished(client, batch).vms
    assert vm.status == "done", vm.error
    report = json.loads((tmp_path / "dry" / "dry1.json").read_text())
    fstab = next(f for f in report["fixes"] if f["target"] == "/etc/fstab")
    assert fstab["applied"] is False and "/dev/sda3" not in fstab["after"]
    with VMCraft(report["disks"][0]["target"]) as g:
        (root,) = g.inspect_os()
        assert "/dev/sda3" in g.guest(root).cat("/etc/fstab")
