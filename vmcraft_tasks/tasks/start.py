"""start: place a batch VM on this host (its pin, its host group, a free slot, the
batch's per-host limit) and hand it to the conversion, here."""

from __future__ import annotations

import time
from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.batches import BatchStore
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.models.plan import BatchLimits
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue
from vmcraft_tasks.tasks import canvas
from vmcraft_tasks.tasks.runner import (
    HOST_FULL_MAX_RETRIES,
    HOST_FULL_RETRY_S,
    VMStep,
    context,
    plan,
)
from worker.runtime import runtime

STEP = pipeline.step("start")


@app.task(name=STEP.task, bind=True, base=VMStep, max_retries=HOST_FULL_MAX_RETRIES)
def start(self: VMStep, message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    vm = plan(rt, ctx)
    assert ctx.batch is not None and ctx.vm_id is not None  # plan() checked both
    pinned = vm.host
    group = vm.host_group or ()
    if pinned and pinned != rt.host_id:
        raise self.retry(countdown=0, queue=host_queue(pinned))
    if group and rt.host_id not in group:
        # Not one of ours: back to the shared queue for a host of the group.
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=INTAKE_QUEUE)
    # A pinned VM waits for its host; any other goes back to the shared queue.
    wait_queue = host_queue(pinned) if pinned else INTAKE_QUEUE
    store = BatchStore(rt.state)
    limits = BatchLimits.from_dict(store.plan(ctx.batch).get("limits") or {})
    per_host = limits.max_per_host or 0
    if not store.take_host_place(ctx.batch, rt.host_id, ctx.vm_id, per_host):
        # The batch already runs max_per_host VMs here: another host, or later.
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=wait_queue)
    if rt.leases.acquire(ctx.job_id) is None:
        store.release_host_place(ctx.batch, rt.host_id, ctx.vm_id)
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=wait_queue)
    if not rt.jobs.transition(ctx.job_id, jobs.CONVERTING, host=rt.host_id):
        rt.leases.release(ctx.job_id)
        store.release_host_place(ctx.batch, rt.host_id, ctx.vm_id)
        return {"job_id": ctx.job_id, "ok": False, "error": "job already ended"}
    rt.jobs.set_progress(ctx.job_id, worker_pid=rt.worker_pid, started_at=time.time())
    placed = ctx.with_(host=rt.host_id)
    raise self.replace(canvas.hand_on(STEP.name, placed, pipeline.flow_of(vm.to_dict())))
