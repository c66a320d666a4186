"""Starting the migration of one VM of a batch: its job context and where it goes.

Used both by the scheduler (first dispatch) and by the step that ends a VM (the
batch then starts its next VM by itself), and by the fleet's own recovery: a VM
handed back to the queue (its host shut down mid-conversion, or went offline) is
started again with a new start message, and a VM the reconciler or watchdog ended
gets its report and releases its batch place the same way a step would.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from vmcraft_tasks import jobs, keys
from vmcraft_tasks.batches import BatchStore, dispatch, job_id_for
from vmcraft_tasks.jobs import JobStore
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue

log = logging.getLogger(__name__)

START_TASK = "vmcraft.vm.start"


def vm_plan(plan: dict[str, Any], vm_id: str) -> dict[str, Any]:
    for vm in plan["vms"]:
        if vm["id"] == vm_id:
            return dict(vm)
    raise KeyError(f"batch {plan['batch']} has no VM {vm_id!r}")


def start_queue(vm: dict[str, Any]) -> str:
    """A pinned VM goes only to its host; every other VM to the shared intake queue."""
    return host_queue(vm["host"]) if vm.get("host") else INTAKE_QUEUE


def vm_context(batch: str, vm: dict[str, Any]) -> dict[str, Any]:
    """The start message of a batch VM: it names the VM; the plan stays in Redis."""
    return {
        "job_id": job_id_for(batch, vm["id"]),
        "batch": batch,
        "vm_id": vm["id"],
        "image": vm["disks"][0]["source"],
    }


def batch_vm_of(client: redis.Redis, job_id: str) -> tuple[str, str] | None:
    """(batch, VM id) of a batch VM's job, from its record (None: a lone job)."""
    raw = client.hget(keys.job_key(job_id), "batch")
    batch = raw.decode() if isinstance(raw, bytes) else raw
    if not batch or not job_id.startswith(batch + "."):
        return None
    return batch, job_id[len(batch) + 1 :]


def release_host_place(store: BatchStore, job_store: JobStore, batch: str, vm_id: str) -> None:
    """The VM no longer counts against its host's `limits.max_per_host`."""
    _status, host = job_store.status_and_host(job_id_for(batch, vm_id))
    if host:
        store.release_host_place(batch, host, vm_id)


def _attempts_key(batch: str) -> str:
    return keys.batch_attempts_key(batch)


def start_task_id(batch: str, vm_id: str, attempt: int) -> str:
    return f"{job_id_for(batch, vm_id)}-start-{attempt}"


def current_start_id(client: redis.Redis, batch: str, vm_id: str) -> str | None:
    """The task id of the VM's latest start message (None: never sent, or forgotten)."""
    raw = client.hget(_attempts_key(batch), vm_id)
    return start_task_id(batch, vm_id, int(raw)) if raw is not None else None


def send_vm(app: Celery, store: BatchStore, batch: str, vm_id: str) -> str:
    """Send the VM's start message; returns its task id. Each send is a new attempt:
    a start message of an older attempt that turns up later does nothing."""
    vm = vm_plan(store.plan(batch), vm_id)
    ctx = vm_context(batch, vm)
    task_id = start_task_id(batch, vm_id, _attempt(store, batch, vm_id))
    app.send_task(START_TASK, args=[ctx], queue=start_queue(vm), task_id=task_id)
    return task_id


def _attempt(store: BatchStore, batch: str, vm_id: str) -> int:
    """Task ids stay unique across resumes of the same VM."""
    return store.next_attempt(batch, vm_id)  # refreshes the batch's TTL too


def requeue_vm(
    app: Celery, store: BatchStore, job_store: JobStore, batch: str, vm_id: str, *, note: str
) -> bool:
    """Hand a VM that holds nothing on any host back to the queue, to start again
    anywhere it may run; `note` says why (kept in its progress). False when the VM
    ended meanwhile or its batch is gone."""
    job_id = job_id_for(batch, vm_id)
    if not store.exists(batch):
        return False
    release_host_place(store, job_store, batch, vm_id)
    if not job_store.transition(job_id, jobs.QUEUED, host=""):
        return False
    job_store.set_progress(job_id, requeued=note)
    send_vm(app, store, batch, vm_id)
    log.warning("VM %s requeued: %s", job_id, note)
    return True


def vm_ended(app: Celery, store: BatchStore, job_store: JobStore, batch: str, vm_id: str) -> None:
    """Release the VM's place in its batch (once) and start whatever may start now;
    the VM that ends the batch writes its summary."""
    if not store.exists(batch):
        # Redis lost the batch (a restart without persistence): nothing to account to.
        log.warning("VM %s of batch %s ended, but the batch record is gone", vm_id, batch)
        return
    release_host_place(store, job_store, batch, vm_id)
    if store.mark_ended(batch, vm_id):
        dispatch(store, batch, lambda next_id: _start(app, store, job_store, batch, next_id))
        write_summary_if_finished(store, job_store, batch)


def write_summary_if_finished(store: BatchStore, job_store: JobStore, batch: str) -> bool:
    counts = store.counts(batch)
    if counts.pending or counts.ended < counts.total:
        return False
    from vmcraft_tasks.outputs import write_batch_summary

    plan = store.plan(batch)
    records = {vm["id"]: job_store.get(job_id_for(batch, vm["id"])) for vm in plan["vms"]}
    meta = store.meta(batch)
    from vmcraft_tasks.outfiles import OutputError

    try:
        write_batch_summary(plan, records, started_at=float(meta.get("submitted") or 0))
    except OutputError as exc:
        # The batch still ends; `vmcraft-tasks report` names the problem again.
        log.warning("batch %s: no summary written: %s", batch, exc)
    except ValueError as exc:
        # A report that breaks its published model (a bug here) is never written; the
        # batch still ends, and the log says why its summary is missing.
        log.error("batch %s: no summary written: a VM report breaks its model: %s", batch, exc)
    return True


def _start(app: Celery, store: BatchStore, job_store: JobStore, batch: str, vm_id: str) -> None:
    job_id = job_id_for(batch, vm_id)
    if job_store.get(job_id).status == jobs.CANCELLED:
        vm_ended(app, store, job_store, batch, vm_id)
        return
    send_vm(app, store, batch, vm_id)
