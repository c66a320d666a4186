"""Starting the migration of one VM of a batch: its job context and where it goes.

Used both by the scheduler (first dispatch) and by the step that ends a VM (the
batch then starts its next VM by itself).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from vmcraft_tasks import jobs
from vmcraft_tasks.batches import BatchStore, dispatch, job_id_for
from vmcraft_tasks.jobs import JobStore
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue

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
    return {
        "job_id": job_id_for(batch, vm["id"]),
        "batch": batch,
        "vm_id": vm["id"],
        "plan": vm,
        "image": vm["disks"][0]["source"],
    }


def send_vm(app: Celery, store: BatchStore, batch: str, vm_id: str) -> None:
    vm = vm_plan(store.plan(batch), vm_id)
    ctx = vm_context(batch, vm)
    app.send_task(
        START_TASK,
        args=[ctx],
        queue=start_queue(vm),
        task_id=f"{ctx['job_id']}-start-{_attempt(store, batch, vm_id)}",
    )


def _attempt(store: BatchStore, batch: str, vm_id: str) -> int:
    """Task ids stay unique across resumes of the same VM."""
    return int(store.client.hincrby(f"vmcraft:v1:batch:{batch}:attempts", vm_id, 1))


def vm_ended(app: Celery, store: BatchStore, job_store: JobStore, batch: str, vm_id: str) -> None:
    """Release the VM's place in its batch (once) and start whatever may start now;
    the VM that ends the batch writes its summary."""
    if store.mark_ended(batch, vm_id):
        dispatch(store, batch, lambda next_id: _start(app, store, job_store, batch, next_id))
        write_summary_if_finished(store, job_store, batch)


def write_summary_if_finished(store: BatchStore, job_store: JobStore, batch: str) -> bool:
    counts = store.counts(batch)
    if counts.pending or counts.ended < counts.total:
        return False
    from vmcraft_tasks.batches import job_id_for
    from vmcraft_tasks.outputs import write_batch_summary

    plan = store.plan(batch)
    records = {vm["id"]: job_store.get(job_id_for(batch, vm["id"])) for vm in plan["vms"]}
    meta = store.meta(batch)
    write_batch_summary(plan, records, started_at=float(meta.get("submitted") or 0))
    return True


def _start(app: Celery, store: BatchStore, job_store: JobStore, batch: str, vm_id: str) -> None:
    job_id = job_id_for(batch, vm_id)
    if job_store.get(job_id).status == jobs.CANCELLED:
        vm_ended(app, store, job_store, batch, vm_id)
        return
    send_vm(app, store, batch, vm_id)
