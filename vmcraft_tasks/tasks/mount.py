"""mount_partition: one filesystem of the VM (a partition of any disk, or an LV),
under the host-wide mount limit. The
fan-out of the pipeline: one task per filesystem, all joined by the inspection."""

from __future__ import annotations

import time
from typing import Any

from vmcraft_tasks import pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft import mountinfo
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.inspect_disk import private_mountpoint
from vmcraft_tasks.models.context import MountOutcome
from vmcraft_tasks.tasks.runner import VMStep, context, state_dir
from worker import timeline
from worker.runtime import runtime

STEP = pipeline.step("mount_partition")


@app.task(name=STEP.task, bind=True, base=VMStep)
def mount_partition(
    self: VMStep, message: dict[str, Any], number: int, fstype: str | None = None
) -> dict[str, Any]:
    """A filesystem that will not mount is a value, not an error, so the chord body
    still runs."""
    rt = runtime()
    ctx = context(message)
    job_id = ctx.job_id
    token = f"{job_id}:{number}"
    with rt.mount_slots.hold(token, timeout_s=rt.settings.mount_wait_s):
        started = time.time()
        vm = GuestVM.resume(state_dir(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
        try:
            mountpoint = private_mountpoint(vm.boot_disk, number)
            if mountinfo.is_mountpoint(mountpoint):
                # A redelivered step whose first run died after mounting: start clean,
                # so the result describes this mount and nothing is stacked on it.
                mountinfo.unmount(mountpoint)
            # The scan already knew the type: no cache round trip to ask again.
            result = vm.mount_with_fallback(number, mountpoint, fstype)
        finally:
            vm.forget()
        ended = time.time()
    timeline.record_interval(rt.state, rt.host_id, "mount", started, ended, token)
    done = rt.jobs.bump_progress(job_id, "mounted")
    self.progress(job_id=job_id, step="mounting", mounted=done, of=ctx.to_mount)
    return MountOutcome(partition=number, result=result).model_dump(mode="json")
