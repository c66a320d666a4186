"""scan: the VM's partitions and filesystems (through the shared scan cache), then
the rest of its pipeline, fanned out: one mount per filesystem, on this host."""

from __future__ import annotations

from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.inspect_disk import mountable
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.tasks import canvas
from vmcraft_tasks.tasks.runner import VMStep, context, flow, state_dir
from worker.runtime import runtime

STEP = pipeline.step("scan")


@app.task(name=STEP.task, bind=True, base=VMStep)
def scan(self: VMStep, message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    job_id = ctx.job_id
    rt.jobs.transition(job_id, jobs.SCANNING)
    g = VMCraft.resume(state_dir(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        with commands.recorded() as ran:
            parts = g.list_partitions()
            filesystems = g.filesystems()
    finally:
        g.forget()
    # What the scan really ran: zero probes means the shared cache answered.
    rt.jobs.set_progress(job_id, scan_sfdisk=ran.count("sfdisk"), scan_blkid=ran.count("blkid"))
    targets = [fs.partition for fs in filesystems if mountable(fs)]
    scanned = ctx.with_(partitions=parts, filesystems=filesystems, mount_targets=targets)
    rt.jobs.transition(job_id, jobs.MOUNTING)
    rt.jobs.set_progress(job_id, mounted=0, to_mount=len(targets))
    self.progress(job_id=job_id, step="scanned", partitions=len(parts))
    raise self.replace(canvas.hand_on(STEP.name, scanned, flow(rt, ctx)))
