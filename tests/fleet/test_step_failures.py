"""An infrastructure failure inside the workflow still ends the VM detached, with a reason."""

from __future__ import annotations

import os

from scheduler.submit import FleetClient
from vmcraft_tasks import keys
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore


def test_mount_step_that_cannot_get_a_place_fails_the_vm_and_detaches(
    fleet_factory, overlay, linux_gpt_raw
):
    fleet = fleet_factory(["h1"], vmcraft_max_mounts="1", vmcraft_mount_wait_s="1")
    client = FleetClient(fleet.settings())
    state = fleet.state
    blocker = RedisSemaphore(state, keys.semaphore_key("h1", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    try:
        record = client.wait(client.submit_inspect(overlay(linux_gpt_raw.path)), timeout_s=60)
    finally:
        blocker.release("test-blocker")
        client.close()
    assert record.status == "failed"
    assert record.error is not None
    assert "vmcraft.vm.mount_partition failed on host h1" in record.error
    assert f"LimitReached: {keys.semaphore_key('h1', 'mounts')}: all 1 places taken" in record.error
    assert attach_state_dirs(os.path.join(fleet.work_root, "h1")) == []
    assert SlotLeases(state, "h1", 4, 5).held() == {}
