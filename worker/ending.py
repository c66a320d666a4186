"""How a VM ends, whichever way it ended: done, failed, cancelled, or its worker lost.

One function, `end_vm`, called by the last step, by the errback of a failed step, by
the step runner for a cancelled or refused VM, by the host's reconciler for a VM whose
worker died, and by the fleet's watchdog for a VM whose host went away. In order:

1. **released**: on the VM's own host, its disks are detached (when the caller names
   an attach state directory this host made for the job) and its slot is given back;
2. **accounted**: the job record moves to its end state (terminal states are sticky:
   a second end does not change the first);
3. **reported**: a batch VM's JSON report is written where the batch's record (not a
   message) says, inside this host's output roots;
4. **next VM started**: the VM's batch place is released (once) and the batch starts
   whatever may start now; the VM that ends the batch writes the summary.

Every part is idempotent, so two callers ending the same VM (an errback after a
cancel, the watchdog after a slow step) do no harm.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal

import redis
from celery import Celery

from vmcraft_tasks import jobs
from vmcraft_tasks.batches import BatchStore
from vmcraft_tasks.craft.vmstate import release_vm
from vmcraft_tasks.jobs import JobNotFoundError, JobStore
from vmcraft_tasks.migration import batch_vm_of, vm_ended, vm_plan
from vmcraft_tasks.outfiles import OutputError
from vmcraft_tasks.outputs import write_vm_report
from worker import timeline
from worker.runtime import HostRuntime

log = logging.getLogger(__name__)

# `ended`: the record already holds its end state (the watchdog accounting for a VM
# whose last step died): only the report and the batch are left to do.
Outcome = Literal["done", "failed", "cancelled", "ended"]


def release(rt: HostRuntime, job_id: str, state_dir: str | None = None) -> bool:
    """Detach the VM's disks (if `state_dir`, already checked to be this host's attach
    for the job, is still there) and give its slot back; True if the slot was held."""
    if state_dir and os.path.isdir(state_dir):
        # Every disk of the VM and its LVs, in the order they hold each other.
        release_vm(state_dir)
    if not rt.leases.release(job_id):
        return False  # released before: the VM's time on this host is recorded once
    try:
        record = rt.jobs.get(job_id)
    except JobNotFoundError:
        return True
    attached_at = record.progress.get("attached_at")
    if isinstance(attached_at, float):
        timeline.record_interval(rt.state, rt.host_id, "vm", attached_at, time.time(), job_id)
    return True


def end_vm(
    app: Celery,
    client: redis.Redis,
    job_id: str,
    outcome: Outcome,
    rt: HostRuntime | None = None,
    *,
    reason: str | None = None,
    result: dict[str, Any] | None = None,
    state_dir: str | None = None,
) -> bool:
    """End the VM (see the module doc). `rt` is the runtime of the VM's host (None: the
    caller is elsewhere, nothing host-local is released). True when this call moved
    the job to its end state."""
    if rt is not None:
        release(rt, job_id, state_dir)
    store = JobStore(client)
    if outcome == "done":
        moved = store.transition(job_id, jobs.DONE, result=result or {})
    elif outcome == "failed":
        # A failed VM's result (a boot check's evidence) still goes into its report.
        extra = {"result": result} if result else {}
        moved = store.fail(job_id, reason or "failed", **extra)
    else:
        # cancelled: the scheduler's cancel set the state, the VM only stops here.
        moved = False
    _report_and_move_on(app, client, job_id, rt)
    return moved


def _report_and_move_on(
    app: Celery, client: redis.Redis, job_id: str, rt: HostRuntime | None
) -> None:
    batch_vm = batch_vm_of(client, job_id)
    if batch_vm is None:
        return  # a lone inspection: its record is its report
    batch, vm_id = batch_vm
    batches, job_store = BatchStore(client), JobStore(client)
    if not batches.exists(batch):
        log.warning("VM %s ended, but the record of batch %s is gone", job_id, batch)
        return
    try:
        record = job_store.get(job_id)
        vm = vm_plan(batches.plan(batch), vm_id)
    except (JobNotFoundError, KeyError) as exc:
        log.warning("no report for %s: %s", job_id, exc)
    else:
        if record.finished:
            roots = rt.settings.output_roots if rt is not None else None
            try:
                write_vm_report(vm, record, settings_roots=roots)
            except OutputError as exc:
                log.warning("no report for %s: %s", job_id, exc)
            except Exception as exc:  # a report that cannot be written must not stall the batch
                log.warning("could not write the report of %s: %s", job_id, exc)
    vm_ended(app, batches, job_store, batch, vm_id)
