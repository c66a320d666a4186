"""inspect: the chord body. Finds the VM's OS roots on what the mounts exposed (fstab
resolved across all of its disks and LVs) and starts the VM's result."""

from __future__ import annotations

from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.inspect_disk import find_roots
from vmcraft_tasks.models.context import MountOutcome, VMResult
from vmcraft_tasks.tasks.runner import VMStep, context, state_dir
from worker.runtime import runtime

STEP = pipeline.step("inspect")


@app.task(name=STEP.task, bind=True, base=VMStep)
def inspect_vm(self: VMStep, mounts: list[dict[str, Any]], message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    rt.jobs.transition(ctx.job_id, jobs.INSPECTING)
    results = {m.partition: m.result for m in (MountOutcome.model_validate(raw) for raw in mounts)}
    vm = GuestVM.resume(state_dir(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        found = vm.scan()
        boot = vm.boot_disk
        roots = find_roots(boot, ctx.partitions, ctx.filesystems, results, volumes=found.volumes)
        layout = vm.layout()
        result = VMResult(
            job_id=ctx.job_id,
            host=rt.host_id,
            image=boot.image.to_dict(),
            backend=boot.backend_name,
            attach_attempts=boot.attach_attempts,
            readonly=boot.readonly,
            partitions=ctx.partitions,
            filesystems=ctx.filesystems,
            mounts={str(n): r for n, r in sorted(results.items())},
            roots=[r.to_dict() for r in roots],
            disks=layout["disks"],
            lvs=layout["lvs"],
            volumes=layout["volumes"],
            scan_notes=layout["notes"],
            # A lone disk without LVs keeps the boot-disk wording of `fix`.
            no_root=None
            if roots or not (found.lvs or len(found.disks) > 1)
            else vm.no_root_reason(),
        )
    finally:
        vm.forget()
    self.progress(job_id=ctx.job_id, step="inspected", roots=len(roots))
    return result.to_json()
