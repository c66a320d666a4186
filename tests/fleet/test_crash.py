"""kill -9 a worker in the middle of a VM: the restarted host cleans up and the VM ends."""

from __future__ import annotations

import os
import time

from scheduler.submit import FleetClient
from tests import leaks
from vmcraft_tasks import keys
from vmcraft_tasks.craft.nbd.helpers import AttachResources, process_alive
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from vmcraft_tasks.embedded.fleet import kill_group
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
