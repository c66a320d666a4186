"""scan: the VM's partitions, LVs and filesystems on all of its disks (through the
shared scan cache; LVs exposed here), then the rest of its pipeline, fanned out: one
mount per filesystem, on this host."""

from __future__ import annotations

from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.inspect_disk import mountable
from vmcraft_tasks.tasks import canvas
from vmcraft_tasks.tasks.runner import VMStep, context, flow, state_dir, step_options
from worker.runtime import runtime

STEP = pipeline.step("scan")


@app.task(name=STEP.task, bind=True, base=VMStep)
def scan(self: VMStep, message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    job_id = ctx.job_id
    rt.jobs.transition(job_id, jobs.SCANNING)
    vm = GuestVM.resume(state_dir(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        with commands.recorded() as ran:
            found = vm.scan()
    finally:
        vm.forget()
    # What the scan really ran: zero probes means the shared cache answered.
    rt.jobs.set_progress(
        job_id,
        scan_sfdisk=ran.count("sfdisk"),
        scan_blkid=ran.count("blkid"),
        scan_lvm=ran.count("lvm"),
        lvs=len(found.lvs),
    )
    targets = [fs.partition for fs in found.filesystems if mountable(fs)]
    scanned = ctx.with_(
        partitions=found.partitions, filesystems=found.filesystems, mount_targets=targets
    )
    rt.jobs.transition(job_id, jobs.MOUNTING)
    rt.jobs.set_progress(job_id, mounted=0, to_mount=len(targets))
    self.progress(job_id=job_id, step="scanned", partitions=len(found.partitions))
    raise self.replace(canvas.hand_on(STEP.name, scanned, flow(rt, ctx), step_options(rt, ctx)))
