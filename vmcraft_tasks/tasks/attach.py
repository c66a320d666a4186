"""attach: take a slot on this host, attach every disk of the VM, hand the VM on to
the scan on this host. For a lone inspection this step places the VM (any host takes it
from the intake queue); for a migration it runs where the VM was converted."""

from __future__ import annotations

import time
from typing import Any

from vmcraft_tasks import conversions, jobs, outputs, pipeline, policy
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.jobmarker import write_job_marker
from vmcraft_tasks.models.context import StepContext
from vmcraft_tasks.queues import INTAKE_QUEUE
from vmcraft_tasks.tasks import canvas
from vmcraft_tasks.tasks.runner import (
    HOST_FULL_MAX_RETRIES,
    HOST_FULL_RETRY_S,
    VMStep,
    context,
    end,
    plan,
)
from worker.runtime import HostRuntime, runtime

STEP = pipeline.step("attach")


@app.task(name=STEP.task, bind=True, base=VMStep, max_retries=HOST_FULL_MAX_RETRIES)
def attach(self: VMStep, message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    disks, readonly, flow = what_to_attach(rt, ctx)
    job_id = ctx.job_id
    if rt.leases.acquire(job_id) is None:
        # Full: put the VM back on the intake queue for any host, without blocking.
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=INTAKE_QUEUE)
    if not rt.jobs.transition(job_id, jobs.ATTACHING, host=rt.host_id):
        rt.leases.release(job_id)
        return {"job_id": job_id, "ok": False, "error": "job already ended"}
    rt.jobs.set_progress(job_id, worker_pid=rt.worker_pid, attached_at=time.time())
    # Every disk of the VM on this host, under the one lease: its LVs may span them.
    vm = GuestVM(
        [path for path, _ in disks],
        readonly=readonly,
        settings=rt.craft_settings,
        cache=rt.cache,
        formats=[fmt for _, fmt in disks],
    )
    try:
        vm.launch()
    except VMCraftError as exc:
        end(rt, ctx, "failed", reason=str(exc))
        return {"job_id": job_id, "ok": False, "error": str(exc)}
    for disk_dir in vm.state_dirs:
        write_job_marker(disk_dir, job_id, rt.host_id, rt.worker_pid)
    boot = vm.boot_disk
    rt.jobs.set_progress(
        job_id, attach_attempts=boot.attach_attempts, backend=boot.backend_name, disks=len(disks)
    )
    attached = ctx.with_(host=rt.host_id, state_dir=vm.parent)
    vm.forget()
    self.progress(job_id=job_id, step="attached", host=rt.host_id, disks=len(disks))
    raise self.replace(canvas.hand_on(STEP.name, attached, flow))


def what_to_attach(
    rt: HostRuntime, ctx: StepContext
) -> tuple[list[tuple[str, str | None]], bool, pipeline.Flow]:
    """([(image, format)] boot disk first, readonly, flow) as this worker's policy
    decides, whatever the message says; the format is known only for the worker's own
    conversions."""
    if not ctx.in_batch:
        request = policy.inspect_request(ctx.to_message(), rt.settings.image_roots)
        return [(request.image, None)], True, "inspect"
    vm = plan(rt, ctx)
    roots = outputs.vm_output_roots(vm.to_dict(), settings_roots=rt.settings.output_roots)
    # Only the tool's own, unchanged conversions are ever attached (and maybe writable).
    for disk in vm.disks:
        if conversions.already_converted(disk.source, disk.target, roots) is None:
            raise policy.MessageRefused(f"{disk.target} is not a finished conversion of this VM")
    writable = policy.write_mode(vm.to_dict())
    disks: list[tuple[str, str | None]] = [(disk.target, vm.target_format) for disk in vm.disks]
    return disks, not writable, pipeline.flow_of(vm.to_dict())
