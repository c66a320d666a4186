"""convert: copy every disk of the VM to its target format, under the host's
conversion limit, then hand the VM on (to the attach of its converted copy)."""

from __future__ import annotations

from typing import Any

from vmcraft_tasks import conversions, outputs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.convert import SourceChangedError, convert_image
from vmcraft_tasks.craft.images import ImageInfo, probe_image
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.models.plan import DiskPlan
from vmcraft_tasks.tasks import canvas
from vmcraft_tasks.tasks.runner import VMStep, context, plan
from worker.conversions import guarded_conversion, safe_progress
from worker.runtime import runtime

CONVERSION_WAIT_S = 6 * 3600.0
PROGRESS_STEP_PCT = 2.0

STEP = pipeline.step("convert")
_SETTINGS = app.conf.vmcraft_settings


@app.task(
    name=STEP.task,
    bind=True,
    base=VMStep,
    soft_time_limit=_SETTINGS.convert_time_limit_s - 60,
    time_limit=_SETTINGS.convert_time_limit_s,
)
def convert(self: VMStep, message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    vm = plan(rt, ctx)
    job_id = ctx.job_id
    own = rt.settings.output_roots
    outputs.check_vm_outputs(vm.to_dict(), settings_roots=own)
    roots = outputs.vm_output_roots(vm.to_dict(), settings_roots=own)
    results = []
    for index, disk in enumerate(vm.disks):
        done = conversions.already_converted(disk.source, disk.target, roots)
        if done is not None:
            results.append({**done.conversion, "skipped": "already converted"})
            continue
        last = [-PROGRESS_STEP_PCT]

        def report(pct: float, index: int = index, last: list[float] = last) -> None:
            if pct - last[0] >= PROGRESS_STEP_PCT or pct >= 100.0:
                last[0] = pct
                rt.jobs.set_progress(job_id, convert_disk=index, convert_pct=round(pct, 1))
                self.progress(job_id=job_id, step="converting", disk=index, pct=round(pct, 1))

        def copy(staged: str, disk: DiskPlan = disk, report: Any = report) -> Any:
            checked = source_as_submitted(disk, rt.craft_settings)
            return convert_image(
                disk.source,
                staged,
                timeout_s=_SETTINGS.convert_time_limit_s - 120,
                target_format=vm.target_format,
                progress=safe_progress(report),
                overwrite=False,
                settings=rt.craft_settings,
                expected=checked,
            ).to_dict()

        # The guard stops the copy at a warm shutdown or when the VM ends meanwhile,
        # and records qemu-img's temporary file so a dead worker's copy is cleaned up.
        with guarded_conversion(rt, job_id, index, disk.target, wait_s=CONVERSION_WAIT_S):
            marker = conversions.convert_confined(disk.source, disk.target, roots, copy)
        results.append(marker.conversion)
    rt.jobs.set_progress(job_id, conversions=results, convert_pct=100.0)
    # attach derives the image and write mode from the batch's record, not from here.
    converted = ctx.with_(conversions=results)
    raise self.replace(canvas.hand_on(STEP.name, converted, pipeline.flow_of(vm.to_dict())))


def source_as_submitted(disk: DiskPlan, settings: CraftSettings) -> ImageInfo:
    """Check the source again now; a source that is no longer what was submitted (a
    raw disk truncated, say: nothing in it records its size) fails the VM."""
    info = probe_image(disk.source, settings=settings)
    submitted = disk.virtual_size
    if submitted and info.virtual_size != submitted:
        raise SourceChangedError(
            disk.source,
            disk.target,
            f"its virtual size changed from {submitted} to {info.virtual_size} bytes "
            "since the batch was submitted",
        )
    if disk.format and info.format != disk.format:
        raise SourceChangedError(
            disk.source,
            disk.target,
            f"it is now a {info.format} image, it was {disk.format} when submitted",
        )
    return info
