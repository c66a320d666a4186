"""inspect: the chord body. Finds the VM's OS roots on what the mounts exposed and
starts the VM's result."""

from __future__ import annotations

from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.inspect_disk import find_roots
from vmcraft_tasks.craft.vmcraft import VMCraft
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
    g = VMCraft.resume(state_dir(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        roots = find_roots(g, ctx.partitions, ctx.filesystems, results)
        result = VMResult(
            job_id=ctx.job_id,
            host=rt.host_id,
            image=g.image.to_dict(),
            backend=g.backend_name,
            attach_attempts=g.attach_attempts,
            readonly=g.readonly,
            partitions=ctx.partitions,
            filesystems=ctx.filesystems,
            mounts={str(n): r for n, r in sorted(results.items())},
            roots=[r.to_dict() for r in roots],
        )
    finally:
        g.forget()
    self.progress(job_id=ctx.job_id, step="inspected", roots=len(roots))
    return result.to_json()
