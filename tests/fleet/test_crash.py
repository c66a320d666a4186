"""kill -9 a worker in the middle of a VM: the restarted host cleans up and the VM ends."""

from __future__ import annotations

import os
import time

import yaml

from scheduler.batch import batch_status, submit_batch
from scheduler.submit import FleetClient
from tests import leaks
from tests.lvmhost import tree_digest
from vmcraft_tasks import keys
from vmcraft_tasks.craft.lvm import expose
from vmcraft_tasks.craft.nbd.helpers import AttachResources, process_alive
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from vmcraft_tasks.craft.vmstate import VMRecord
from vmcraft_tasks.embedded.fleet import kill_group
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes import rhel_lvm
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore


def test_kill_9_mid_vm_then_restart_leaves_nothing_and_fails_the_vm(
    fleet_factory, overlay, linux_gpt_raw
):
    fleet = fleet_factory(["h1"], concurrency=2, vmcraft_max_mounts="1")
    client = FleetClient(fleet.settings())
    state = fleet.state
    # Hold the host's only mount place, so the VM stops after attaching, mid-flight.
    blocker = RedisSemaphore(state, keys.semaphore_key("h1", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    try:
        job = client.submit_inspect(overlay(linux_gpt_raw.path))
        host_dir = os.path.join(fleet.work_root, "h1")
        deadline = time.monotonic() + 30
        while client.jobs.get(job).status != "mounting":
            assert time.monotonic() < deadline, client.jobs.get(job)
            time.sleep(0.05)
        (state_dir,) = attach_state_dirs(host_dir)
        res = AttachResources.load(state_dir)
        assert res.qemu_nbd_pid is not None and res.nbdfuse_pid is not None
        assert process_alive(res.qemu_nbd_pid) and res.loop_devices

        killed = fleet.kill9("h1")
        kill_group(killed.pid)  # the dead worker's orphaned pool processes
        # The disk outlived the worker: helpers run in their own session.
        assert process_alive(res.qemu_nbd_pid)

        fleet.start("h1", concurrency=2)
        fleet.wait_online(["h1"])
        record = client.wait(job, timeout_s=30)
        assert record.status == "failed"
        assert record.error is not None
        assert "died while the VM was in flight" in record.error
        assert attach_state_dirs(host_dir) == []
        assert not process_alive(res.qemu_nbd_pid) and not process_alive(res.nbdfuse_pid)
        assert SlotLeases(state, "h1", 4, 5).held() == {}
        snapshot = leaks.snapshot()
        assert not [p for p in snapshot.helpers if "qemu-nbd" in p or "nbdfuse" in p]
        assert not [m for m in snapshot.mounts if m.startswith(str(fleet.work_root))]
    finally:
        blocker.release("test-blocker")
        client.close()
    # The restarted host still works.
    client = FleetClient(client.settings)
    try:
        again = client.wait(client.submit_inspect(overlay(linux_gpt_raw.path)), timeout_s=60)
        assert again.status == "done"
    finally:
        client.close()


def scanned_boot_dir(host_dir: str) -> str | None:
    """The boot disk's attach of a VM whose scan is recorded (its LVs exposed)."""
    for d in attach_state_dirs(host_dir):
        record = VMRecord.load(d)
        if record is not None and record.scan is not None:
            return d
    return None


def test_kill_9_with_a_multi_disk_lvm_vm_attached_releases_every_disk_and_lv(
    fleet_factory, tmp_path
):
    """The worker dies after the scan exposed the LVs (nbdkit for the ones spanning
    disks): the restarted host's reconciler releases the LVs and both disks."""
    host_lvm = {t: tree_digest(t) for t in ("/etc/lvm", "/run/lvm")}
    built = rhel_lvm.rhel_lvm()
    fleet = fleet_factory(["h1"], concurrency=2, vmcraft_max_mounts="1")
    client = FleetClient(fleet.settings())
    state = fleet.state
    blocker = RedisSemaphore(state, keys.semaphore_key("h1", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    try:
        manifest = tmp_path / "batch.yaml"
        vm = {"id": "rhel", "disks": lvmkit.disk_paths(built), "options": {"dry_run": True}}
        manifest.write_text(yaml.safe_dump({"batch": "crash-lvm", "vms": [vm]}))
        batch = submit_batch(client, str(manifest))
        host_dir = os.path.join(fleet.work_root, "h1")
        deadline = time.monotonic() + 300

        while (boot := scanned_boot_dir(host_dir)) is None:
            assert time.monotonic() < deadline, "the VM was never scanned"
            time.sleep(0.1)
        dirs = attach_state_dirs(host_dir)
        assert len(dirs) == 2
        lv_dirs = expose.state_dirs(boot)
        nbdkit_pids = [
            pid for sd in lv_dirs if (pid := expose.LVResources.load(sd).nbdkit_pid) is not None
        ]
        assert nbdkit_pids and all(process_alive(p) for p in nbdkit_pids)

        killed = fleet.kill9("h1")
        kill_group(killed.pid)
        # The LVs outlived the worker: nbdkit runs daemonised, in its own session.
        assert all(process_alive(p) for p in nbdkit_pids)

        fleet.start("h1", concurrency=2)
        fleet.wait_online(["h1"])
        deadline = time.monotonic() + 60
        while attach_state_dirs(host_dir):
            assert time.monotonic() < deadline, attach_state_dirs(host_dir)
            time.sleep(0.2)
        assert not any(process_alive(p) for p in nbdkit_pids)
        snapshot = leaks.snapshot()
        helpers = ("qemu-nbd", "nbdfuse", "nbdkit")
        assert not [p for p in snapshot.helpers if any(h in p for h in helpers)]
        assert not [m for m in snapshot.mounts if m.startswith(str(fleet.work_root))]
        assert SlotLeases(state, "h1", 4, 5).held() == {}
        assert {t: tree_digest(t) for t in host_lvm} == host_lvm
        (ended,) = batch_status(client, batch).vms
        assert ended.status == "failed" and "died while the VM was in flight" in (ended.error or "")
    finally:
        blocker.release("test-blocker")
        client.close()
