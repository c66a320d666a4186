"""The boot-check step's ways out: a cancel stops qemu at once; a warm shutdown kills it
and hands the VM back; a worker killed with -9 mid-check leaves no qemu behind once the
host's reconciler has run, and the VM's check runs again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from scheduler.batch import batch_status, cancel_batch, submit_batch
from scheduler.submit import FleetClient
from tests import leaks
from vmcraft_tasks.embedded.fleet import kill_group
from worker import bootchecks

pytestmark = pytest.mark.timeout(900)


def boot_checking(client: FleetClient, batch: str, host_dir: str, timeout_s: float = 600):
    """Wait until the VM's boot check runs qemu: (its record, the qemu pid)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for _p, r in bootchecks.records(host_dir) if r.pid is not None]
        if found:
            (record,) = found
            assert record.pid is not None
            return record, record.pid
        (vm,) = batch_status(client, batch).vms
        assert vm.status not in ("done", "failed", "cancelled"), (vm.status, vm.error)
        assert time.monotonic() < deadline, vm.status
        time.sleep(0.2)


def cancelled_and_stopped(
    client: FleetClient,
    batch: str,
    host_dir: str,
    record: bootchecks.BootRecord,
    *,
    timeout_s: float,
) -> None:
    """After a cancel: the check's qemu is gone, the VM cancelled, no record left."""
    assert record.pid is not None
    deadline = time.monotonic() + timeout_s
    while bootchecks.is_our_qemu(record.pid, record.ticks, record.marker):
        assert time.monotonic() < deadline, "qemu still running after the cancel"
        time.sleep(0.1)
    while (vm := batch_status(client, batch).vms[0]).status != "cancelled":
        assert time.monotonic() < deadline, vm.status
        time.sleep(0.1)
    while bootchecks.records(host_dir):
        assert time.monotonic() < deadline, bootchecks.records(host_dir)
        time.sleep(0.1)


def submit(client: FleetClient, directory: Path, batch: str, disk: str) -> str:
    manifest = directory / f"{batch}.yaml"
    vms = [{"id": "deb", "disks": [disk], "options": {"boot_check": True}}]
    manifest.write_text(yaml.safe_dump({"batch": batch, "vms": vms}))
    return submit_batch(client, str(manifest))


def test_cancel_stops_the_boot_check_and_its_qemu(fleet_factory, tmp_path, bootable_bios):
    # TCG as asked: the KVM probe is the subject of tests/boot, not of these.
    fleet = fleet_factory(["h1"], concurrency=2, vmcraft_boot_accel="tcg")
    client = FleetClient(fleet.settings())
    try:
        batch = submit(client, tmp_path, "cancel-boot", bootable_bios.path)
        host_dir = os.path.join(fleet.work_root, "h1")
        record, pid = boot_checking(client, batch, host_dir)
        assert bootchecks.is_our_qemu(pid, record.ticks, record.marker)
        cancel_batch(client, batch)
        cancelled_and_stopped(client, batch, host_dir, record, timeout_s=30)
    finally:
        client.close()


def test_kill_9_during_a_boot_check_leaves_no_qemu(fleet_factory, tmp_path, bootable_bios):
    # TCG as asked: the KVM probe is the subject of tests/boot, not of these.
    fleet = fleet_factory(["h1"], concurrency=2, vmcraft_boot_accel="tcg")
    client = FleetClient(fleet.settings())
    try:
        batch = submit(client, tmp_path, "kill-boot", bootable_bios.path)
        host_dir = os.path.join(fleet.work_root, "h1")
        record, pid = boot_checking(client, batch, host_dir)
        killed = fleet.kill9("h1")
        kill_group(killed.pid)  # the dead worker's orphaned pool processes
        # qemu outlived the worker: it runs in a session of its own.
        assert bootchecks.is_our_qemu(pid, record.ticks, record.marker)

        fleet.start("h1", concurrency=2)
        fleet.wait_online(["h1"])
        deadline = time.monotonic() + 60
        while bootchecks.is_our_qemu(pid, record.ticks, record.marker):
            assert time.monotonic() < deadline, "the reconciler left the dead check's qemu"
            time.sleep(0.2)
        # The step is rerunnable (snapshot=on: a boot writes nothing): the restarted
        # host's reconciler put its message back, and the VM's check starts again.
        deadline = time.monotonic() + 300
        while not [r for _p, r in bootchecks.records(host_dir) if r.pid not in (None, pid)]:
            (vm,) = batch_status(client, batch).vms
            assert vm.status not in ("done", "failed", "cancelled"), (vm.status, vm.error)
            assert time.monotonic() < deadline, "the check did not start again"
            time.sleep(0.2)
        (again,) = [r for _p, r in bootchecks.records(host_dir)]
        assert again.pid is not None
        cancel_batch(client, batch)  # no need to watch the second boot to its end
        cancelled_and_stopped(client, batch, host_dir, again, timeout_s=60)
        snapshot = leaks.snapshot()
        assert not [p for p in snapshot.helpers if "qemu-system" in p]
    finally:
        client.close()


def test_warm_shutdown_kills_qemu_and_hands_the_vm_back(fleet_factory, tmp_path, bootable_bios):
    # TCG as asked: the KVM probe is the subject of tests/boot, not of these.
    fleet = fleet_factory(["h1"], concurrency=2, vmcraft_boot_accel="tcg")
    client = FleetClient(fleet.settings())
    try:
        batch = submit(client, tmp_path, "shutdown-boot", bootable_bios.path)
        host_dir = os.path.join(fleet.work_root, "h1")
        record, pid = boot_checking(client, batch, host_dir)
        worker = fleet.hosts["h1"]
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        # The worker asks its checks to stop: qemu goes at once, not after the boot.
        while bootchecks.is_our_qemu(pid, record.ticks, record.marker):
            assert time.monotonic() - started < 30, "qemu outlived the warm shutdown"
            time.sleep(0.1)
        worker.proc.wait(timeout=60)
        fleet.hosts.pop("h1")
        (vm,) = batch_status(client, batch).vms
        # Handed back, resumable: no other host is up, so it waits in the queue.
        assert vm.status == "queued", (vm.status, vm.error)
        assert bootchecks.records(host_dir) == []
    finally:
        client.close()
