"""Warm shutdown of a host with a VM in flight: the disk is detached, the VM ends with a reason."""

from __future__ import annotations

import os
import signal
import time

from scheduler.submit import FleetClient
from vmcraft_tasks import keys
from vmcraft_tasks.craft.nbd.helpers import AttachResources, process_alive
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from worker.leases import SlotLeases
from worker.registry import list_hosts
from worker.semaphore import RedisSemaphore


def test_warm_shutdown_detaches_what_is_still_attached(fleet_factory, overlay, linux_gpt_raw):
    fleet = fleet_factory(["h1"], concurrency=1, vmcraft_max_mounts="1")
    client = FleetClient(fleet.settings())
    state = fleet.state
    blocker = RedisSemaphore(state, keys.semaphore_key("h1", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    try:
        job = client.submit_inspect(overlay(linux_gpt_raw.path))
        deadline = time.monotonic() + 30
        while client.jobs.get(job).status != "mounting":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the only pool process is now waiting inside the first mount step
        (state_dir,) = attach_state_dirs(os.path.join(fleet.work_root, "h1"))
        res = AttachResources.load(state_dir)
        assert res.qemu_nbd_pid is not None and res.nbdfuse_pid is not None
        worker = fleet.hosts["h1"]
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        blocker.release("test-blocker")  # the running step may now finish
        worker.proc.wait(timeout=60)
        fleet.hosts.pop("h1")
    finally:
        blocker.release("test-blocker")
    record = client.jobs.get(job)
    client.close()
    assert record.status == "failed"
    assert record.error is not None
    assert "host h1 shut down while the VM was in flight" in record.error
    assert not os.path.exists(state_dir)
    assert not process_alive(res.qemu_nbd_pid) and not process_alive(res.nbdfuse_pid)
    assert SlotLeases(state, "h1", 4, 5).held() == {}
    # A clean stop withdraws the host from the registry at once.
    assert not [h for h in list_hosts(state) if h.host_id == "h1" and h.online]
