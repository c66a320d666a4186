"""The orchestrators' API for batches: submit, status, cancel, resume, report.

from scheduler.batch import submit_batch, batch_status
client = FleetClient.from_env()
submit_batch(client, "wave-1.yaml")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scheduler.intake import load_for_run
from scheduler.submit import FleetClient, NoHostOnlineError
from vmcraft_tasks import jobs, keys
from vmcraft_tasks.batches import BatchStore, dispatch, job_id_for
from vmcraft_tasks.jobs import JobNotFoundError, JobRecord
from vmcraft_tasks.migration import send_vm, vm_ended, write_summary_if_finished
from vmcraft_tasks.models import BatchPlan

# A VM whose steps recorded nothing for this long is marked stalled (failed).
DEFAULT_STALL_S = 1800.0


class BatchError(RuntimeError):
    pass


class BatchNotFoundError(BatchError):
    """The batch, or the job record of one of its VMs, is not on this fleet: never
    submitted, expired, or lost with a Redis that came back empty."""

    def __init__(self, batch: str, message: str | None = None) -> None:
        self.batch = batch
        super().__init__(message or f"no batch {batch!r} on this fleet")


@dataclass
class VMStatus:
    vm_id: str
    status: str
    host: str | None
    error: str | None
    progress: dict[str, Any]
    updated: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm_id,
            "status": self.status,
            "host": self.host,
            "error": self.error,
            "progress": self.progress,
            "updated": self.updated,
        }


@dataclass
class BatchStatus:
    batch: str
    vms: list[VMStatus] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for vm in self.vms:
            counts[vm.status] = counts.get(vm.status, 0) + 1
        return counts

    @property
    def finished(self) -> bool:
        return all(vm.status in jobs.TERMINAL for vm in self.vms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "finished": self.finished,
            "counts": self.counts,
            "vms": [vm.to_dict() for vm in self.vms],
        }


def _store(client: FleetClient) -> BatchStore:
    return BatchStore(client.state)


def _existing(client: FleetClient, batch: str) -> BatchStore:
    store = _store(client)
    if not store.exists(batch):
        raise BatchNotFoundError(batch)
    return store


def submit_batch(
    client: FleetClient,
    manifest: str | BatchPlan,
    *,
    failed: dict[str, str] | None = None,
    strict: bool = False,
) -> str:
    """Validate (a path) or take (a plan), record the batch, and start what may start.

    VMs whose disks cannot be used (`failed`: vm id -> reason) end at once as failed
    with their reason; `strict` refuses the whole batch for them instead.
    """
    if isinstance(manifest, BatchPlan):
        plan, failed = manifest, dict(failed or {})
    else:
        plan, failed = load_for_run(
            manifest,
            image_roots=client.settings.image_roots,
            output_roots=client.settings.output_roots,
            strict=strict,
        )
    if not client.online_hosts():
        raise NoHostOnlineError(client.settings.broker_url)
    store = _store(client)
    store.create(
        plan.batch, plan.to_dict(), max_parallel=plan.limits.max_parallel or fleet_capacity(client)
    )
    for vm in plan.vms:
        job_id = job_id_for(plan.batch, vm.id)
        client.jobs.create(job_id, vm.disks[0].source, batch=plan.batch)
        if vm.id in failed:
            client.jobs.fail(job_id, failed[vm.id])
            store.drop_vm(plan.batch, vm.id)
    store.set_meta(plan.batch, submitted=time.time())
    dispatch(store, plan.batch, lambda vm_id: send_vm(client.app, store, plan.batch, vm_id))
    write_summary_if_finished(store, client.jobs, plan.batch)  # every VM already failed
    return plan.batch


def fleet_capacity(client: FleetClient) -> int:
    """Disks the online hosts can hold at once. A batch without its own limit keeps this
    many VMs in flight, so the rest wait in the batch instead of bouncing between full
    hosts (each bounce is a task run and a retry on a busy fleet)."""
    from worker.registry import list_hosts

    slots = sum(
        int(h.info.limits.get("max_attached", 1))
        for h in list_hosts(client.state)
        if h.online and h.info is not None
    )
    return max(slots, 1)


def _plan(store: BatchStore, batch: str) -> dict[str, Any]:
    try:
        return store.plan(batch)
    except KeyError:  # gone since `_existing` looked (expired, or Redis flushed)
        raise BatchNotFoundError(batch) from None


def _record(client: FleetClient, batch: str, vm_id: str) -> JobRecord:
    try:
        return client.jobs.get(job_id_for(batch, vm_id))
    except JobNotFoundError:
        # Job records live 14 days, batches 30, and a Redis restarted without its data
        # loses both: say which VM is gone instead of a KeyError.
        raise BatchNotFoundError(
            batch,
            f"batch {batch!r} is incomplete on this fleet: VM {vm_id!r} has no job record "
            "(expired, or lost by Redis); `resume` runs it again",
        ) from None


def batch_status(
    client: FleetClient, batch: str, *, stall_s: float = DEFAULT_STALL_S
) -> BatchStatus:
    """Where every VM stands. Also the watchdog: stalled VMs are failed with a reason,
    and VMs that ended unnoticed (a killed worker) release their place in the batch."""
    store = _existing(client, batch)
    now = time.time()
    status = BatchStatus(batch)
    for vm_id in store.vm_ids(batch):
        record = _record(client, batch, vm_id)
        updated = _last_update(client, record)
        if (
            record.status not in jobs.TERMINAL
            and record.status != jobs.QUEUED
            and updated is not None
            and now - updated > stall_s
        ):
            client.jobs.fail(record.job_id, f"stalled: no step advanced for {now - updated:.0f} s")
            record = _record(client, batch, vm_id)
        if record.status in jobs.TERMINAL:
            vm_ended(client.app, store, client.jobs, batch, vm_id)
        status.vms.append(
            VMStatus(vm_id, record.status, record.host, record.error, record.progress, updated)
        )
    return status


def _last_update(client: FleetClient, record: JobRecord) -> float | None:
    steps = client.jobs.steps(record.job_id)
    stamps = [s["at"] for s in steps] + list(record.timestamps.values())
    # The host's reconciler stamps `alive_at` while a step of the VM runs: an
    # hours-long conversion records no step, but it is alive, not stalled.
    alive = record.progress.get("alive_at")
    if isinstance(alive, int | float):
        stamps.append(float(alive))
    return max(stamps) if stamps else None


def cancel_batch(client: FleetClient, batch: str) -> list[str]:
    """Cancel every VM that has not ended: waiting ones never start, running ones stop at
    their next step and release what they hold. Returns the VMs cancelled."""
    store = _existing(client, batch)
    waiting = set(store.drop_pending(batch))
    cancelled = []
    for vm_id in store.vm_ids(batch):
        job_id = job_id_for(batch, vm_id)
        if client.jobs.transition(job_id, jobs.CANCELLED, error="cancelled by request"):
            cancelled.append(vm_id)
            # Revoke the start message in case no worker took it yet.
            attempts = client.state.hget(keys.batch_attempts_key(batch), vm_id)
            if attempts:
                client.app.control.revoke(f"{job_id}-start-{int(attempts)}")
            # Its place in the batch is free now, whether or not it ever started.
            store.mark_ended(batch, vm_id)
        elif vm_id in waiting:
            store.mark_ended(batch, vm_id)
    store.set_meta(batch, cancelled=time.time())
    return cancelled


def resume_batch(client: FleetClient, batch: str) -> list[str]:
    """Run again only what did not finish: failed, cancelled and never-started VMs.
    Conversions that completed are not redone (their targets are checked and kept)."""
    store = _existing(client, batch)
    again = []
    for vm_id in store.vm_ids(batch):
        job_id = job_id_for(batch, vm_id)
        try:
            record = client.jobs.get(job_id)
        except JobNotFoundError:
            record = None
        if record is not None and record.status == jobs.DONE:
            continue
        if (
            record is not None
            and record.status not in jobs.TERMINAL
            and record.status != jobs.QUEUED
        ):
            continue  # still running
        plan = _plan(store, batch)
        vm = next(v for v in plan["vms"] if v["id"] == vm_id)
        client.jobs.create(job_id, vm["disks"][0]["source"], batch=batch)
        again.append(vm_id)
    store.requeue(batch, again)
    dispatch(store, batch, lambda vm_id: send_vm(client.app, store, batch, vm_id))
    return again


def batch_report(client: FleetClient, batch: str) -> dict[str, Any]:
    """Write (again) the per-VM reports and the batch summary; returns the summary."""
    from vmcraft_tasks.outputs import write_batch_summary

    store = _store(client)
    plan = _plan(store, batch)
    records = {vm["id"]: _record(client, batch, vm["id"]) for vm in plan["vms"]}
    steps = {vm_id: client.jobs.steps(r.job_id) for vm_id, r in records.items()}
    meta = store.meta(batch)
    return write_batch_summary(plan, records, steps, started_at=float(meta.get("submitted", 0)))
