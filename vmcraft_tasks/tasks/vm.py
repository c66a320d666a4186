"""The steps of one VM: attach -> scan -> chord(mount each partition) -> inspect -> detach.

`attach` runs on whichever host takes the VM from the intake queue; every later
step is pinned to that host's queue (the disk is attached there). The whole tail
is built by the step that knows the host, each signature pinned, because a canvas
that replaces a task loses whatever followed that task in the caller's chain.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import chain, chord

from vmcraft_tasks import conversions, jobs, outputs, policy
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft import commands, mountinfo
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.inspect_disk import find_roots, mountable, private_mountpoint
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.queues import INTAKE_QUEUE, pin
from vmcraft_tasks.tasks.base import VMStep
from worker import timeline
from worker.reconcile import write_job_marker
from worker.runtime import runtime

log = logging.getLogger(__name__)

HOST_FULL_RETRY_S = 0.5
HOST_FULL_MAX_RETRIES = 7200  # an hour of waiting at most before the VM fails


def _ctx(job: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**job, **extra}


def _what_to_attach(
    rt: Any, job: dict[str, Any], *, migrating: bool
) -> tuple[str, bool, str | None]:
    """(image, readonly, format) as this worker's policy decides, whatever the message
    says; the format is known only for the worker's own conversions."""
    if not migrating:
        return policy.inspect_request(job, rt.settings.image_roots).image, True, None
    vm = policy.plan_of(rt, job)
    disk = vm["disks"][0]
    roots = outputs.vm_output_roots(vm, settings_roots=rt.settings.output_roots)
    # Only the tool's own, unchanged conversion is ever attached (and maybe writable).
    if conversions.already_converted(disk["source"], disk["target"], roots) is None:
        raise policy.MessageRefused(f"{disk['target']} is not a finished conversion of this VM")
    return disk["target"], not policy.write_mode(vm), str(vm["target_format"])


def _refused(rt: Any, message: Any, exc: policy.MessageRefused) -> dict[str, Any]:
    """A message this worker will not act on: the job (if it names a real one) fails."""
    log.warning("refused a step message: %s", exc)
    try:
        job_id = policy.job_id_of(message)
    except policy.MessageRefused:
        return {"ok": False, "error": f"refused: {exc}"}
    rt.jobs.fail(job_id, f"refused by host {rt.host_id}: {exc}")
    return {"job_id": job_id, "ok": False, "error": f"refused: {exc}"}


@app.task(name="vmcraft.vm.attach", bind=True, base=VMStep, max_retries=HOST_FULL_MAX_RETRIES)
def attach(self: VMStep, job: dict[str, Any]) -> Any:
    """Take a slot on this host, attach the disk, and hand the VM to this host's queue."""
    rt = runtime()
    migrating = "batch" in job  # the VM's converted copy, in its output folder
    try:
        job_id = policy.job_id_of(job)
        image, readonly, fmt = _what_to_attach(rt, job, migrating=migrating)
    except policy.MessageRefused as exc:
        return _refused(rt, job, exc)
    if rt.leases.acquire(job_id) is None:
        # Full: put the VM back on the intake queue for any host, without blocking.
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=INTAKE_QUEUE)
    if not rt.jobs.transition(job_id, jobs.ATTACHING, host=rt.host_id):
        rt.leases.release(job_id)
        return {"job_id": job_id, "ok": False, "error": "job already ended"}
    rt.jobs.set_progress(job_id, worker_pid=rt.worker_pid, attached_at=time.time())
    try:
        g = VMCraft(image, readonly=readonly, settings=rt.craft_settings, cache=rt.cache)
        g.launch(fmt=fmt)
    except VMCraftError as exc:
        rt.leases.release(job_id)
        rt.jobs.fail(job_id, str(exc))
        if migrating:
            vm_finished(job)
        return {"job_id": job_id, "ok": False, "error": str(exc)}
    state_dir = g.disk.state_dir
    write_job_marker(state_dir, job_id, rt.host_id, rt.worker_pid)
    rt.jobs.set_progress(job_id, attach_attempts=g.attach_attempts, backend=g.backend_name)
    g.forget()
    self.progress(job_id=job_id, step="attached", host=rt.host_id)
    ctx = _ctx(job, host=rt.host_id, state_dir=state_dir)
    raise self.replace(pin(scan.si(ctx), rt.host_id))


@app.task(name="vmcraft.vm.scan", bind=True, base=VMStep)
def scan(self: VMStep, ctx: dict[str, Any]) -> Any:
    """Partitions and filesystems (Redis cache), then fan the mounts out on this host."""
    rt = runtime()
    job_id = ctx["job_id"]
    rt.jobs.transition(job_id, jobs.SCANNING)
    g = VMCraft.resume(policy.state_dir_for(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        with commands.recorded() as ran:
            parts = g.list_partitions()
            filesystems = g.filesystems()
    finally:
        g.forget()
    # What the scan really ran: zero probes means the shared cache answered.
    rt.jobs.set_progress(job_id, scan_sfdisk=ran.count("sfdisk"), scan_blkid=ran.count("blkid"))
    targets = [fs.partition for fs in filesystems if mountable(fs)]
    ctx = _ctx(
        ctx,
        partitions=[p.to_dict() for p in parts],
        filesystems=[fs.to_dict() for fs in filesystems],
        mount_targets=targets,
    )
    rt.jobs.transition(job_id, jobs.MOUNTING)
    rt.jobs.set_progress(job_id, mounted=0, to_mount=len(targets))
    self.progress(job_id=job_id, step="scanned", partitions=len(parts))
    raise self.replace(vm_tail(ctx))


def vm_tail(ctx: dict[str, Any]) -> Any:
    """chord(mount each partition) -> inspect -> detach, all on the VM's host.

    Every step carries its own errback: Celery does not reliably pass a chord
    header's failure to errbacks set on the canvas, and a VM must never be left
    attached because one step raised.
    """
    host = ctx["host"]

    def guarded(sig: Any) -> Any:
        return sig.on_error(detach_on_error.s(ctx))

    types = {f["partition"]: f["type"] for f in ctx["filesystems"]}
    # Header tasks carry only what a mount needs: twenty of them per VM add up.
    slim = {k: ctx[k] for k in ("job_id", "state_dir", "host")}
    slim["of"] = len(ctx["mount_targets"])
    header = [guarded(mount_partition.si(slim, n, types.get(n))) for n in ctx["mount_targets"]]
    body = guarded(inspect_vm.s(ctx)) if header else guarded(inspect_vm.si([], ctx))
    steps: list[Any] = [chord(header, body) if header else body]
    if "batch" in ctx:
        from vmcraft_tasks.tasks.migrate import finalize, fix

        steps += [guarded(fix.s(ctx)), guarded(detach.s(ctx)), guarded(finalize.s(ctx))]
    else:
        steps.append(guarded(detach.s(ctx)))
    return pin(chain(*steps), host)


@app.task(name="vmcraft.vm.mount_partition", bind=True, base=VMStep)
def mount_partition(
    self: VMStep, ctx: dict[str, Any], number: int, fstype: str | None = None
) -> dict[str, Any]:
    """Mount one partition under the host-wide mount limit. A filesystem that will not
    mount is a value, not an error, so the chord body still runs."""
    rt = runtime()
    job_id = ctx["job_id"]
    token = f"{job_id}:{number}"
    with rt.mount_slots.hold(token, timeout_s=rt.settings.mount_wait_s):
        started = time.time()
        g = VMCraft.resume(
            policy.state_dir_for(rt, ctx), settings=rt.craft_settings, cache=rt.cache
        )
        try:
            mountpoint = private_mountpoint(g, number)
            if mountinfo.is_mountpoint(mountpoint):
                # A redelivered step whose first run died after mounting: start clean,
                # so the result describes this mount and nothing is stacked on it.
                mountinfo.unmount(mountpoint)
            # The scan already knew the type: no cache round trip to ask again.
            result = g.mount_with_fallback(number, mountpoint, fstype)
        finally:
            g.forget()
        ended = time.time()
    timeline.record_interval(rt.state, rt.host_id, "mount", started, ended, token)
    done = rt.jobs.bump_progress(job_id, "mounted")
    self.progress(job_id=job_id, step="mounting", mounted=done, of=ctx["of"])
    return {"partition": number, **result.to_dict()}


@app.task(name="vmcraft.vm.inspect", bind=True, base=VMStep)
def inspect_vm(self: VMStep, mounts: list[dict[str, Any]], ctx: dict[str, Any]) -> dict[str, Any]:
    rt = runtime()
    job_id = ctx["job_id"]
    rt.jobs.transition(job_id, jobs.INSPECTING)
    parts = [Partition.from_dict(p) for p in ctx["partitions"]]
    filesystems = [Filesystem.from_dict(f) for f in ctx["filesystems"]]
    results = {
        m["partition"]: MountResult(**{k: v for k, v in m.items() if k != "partition"})
        for m in mounts
    }
    g = VMCraft.resume(policy.state_dir_for(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        roots = find_roots(g, parts, filesystems, results)
        attach = {
            "image": g.image.to_dict(),
            "backend": g.backend_name,
            "attach_attempts": g.attach_attempts,
            "readonly": g.readonly,
        }
    finally:
        g.forget()
    self.progress(job_id=job_id, step="inspected", roots=len(roots))
    return {
        "job_id": job_id,
        "host": rt.host_id,
        **attach,
        "partitions": ctx["partitions"],
        "filesystems": ctx["filesystems"],
        "mounts": {str(n): r.to_dict() for n, r in sorted(results.items())},
        "roots": [r.to_dict() for r in roots],
    }


def release_cancelled(ctx: dict[str, Any]) -> None:
    """A step found its VM cancelled: release what it holds here and end it."""
    _release(ctx)
    if "batch" in ctx:
        vm_finished(ctx)


def vm_finished(ctx: dict[str, Any]) -> None:
    """A batch VM ended (any outcome): write its report, let the batch move on."""
    from vmcraft_tasks.tasks.migrate import end_batch_vm

    end_batch_vm(ctx)


def _release(ctx: dict[str, Any]) -> None:
    """Detach the disk (if still attached here) and give the slot back."""
    rt = runtime()
    if ctx.get("state_dir") and os.path.isdir(ctx["state_dir"]):
        try:
            state_dir = policy.state_dir_for(rt, ctx)
        except policy.MessageRefused as exc:
            # Not an attach this host made for this job: nothing of it is released.
            log.warning("not releasing %s: %s", ctx.get("state_dir"), exc)
        else:
            VMCraft.resume(state_dir, settings=rt.craft_settings, cache=rt.cache).shutdown()
    if not rt.leases.release(ctx["job_id"]):
        return  # released before (an errback after a cancel, say): record the VM once
    record = rt.jobs.get(ctx["job_id"])
    attached_at = record.progress.get("attached_at")
    if isinstance(attached_at, float):
        timeline.record_interval(
            rt.state, rt.host_id, "vm", attached_at, time.time(), ctx["job_id"]
        )


@app.task(name="vmcraft.vm.detach", bind=True, base=VMStep)
def detach(self: VMStep, report: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    rt = runtime()
    rt.jobs.transition(ctx["job_id"], jobs.DETACHING)
    _release(ctx)
    if "batch" not in ctx:  # a migration ends in `finalize`, which writes its reports
        rt.jobs.transition(ctx["job_id"], jobs.DONE, result=report)
    return report


# Errors that are a verdict on the guest, not a crash of the step that raised them.
VERDICT_ERRORS = frozenset({"GuestNotReadyError"})


def _name(exc: BaseException) -> str:
    # An exception Celery could not serialise arrives wrapped; unwrap its name.
    return str(getattr(exc, "exc_cls_name", None) or type(exc).__name__)


def _message(exc: BaseException) -> str:
    """The exception's own message; Celery may hand errbacks a rebuilt exception whose
    str() is a repr."""
    args = getattr(exc, "exc_args", None) or exc.args
    return args[0] if args and isinstance(args[0], str) else str(exc)


def _is_verdict(exc: BaseException) -> bool:
    return _name(exc) in VERDICT_ERRORS


def _describe(exc: BaseException) -> str:
    return f"{_name(exc)}: {_message(exc)}"


# Not bound: Celery passes (request, exc, traceback) only to unbound errback tasks,
# and runs them right away in the worker process where the step failed.
@app.task(name="vmcraft.vm.detach_on_error", base=VMStep, runs_when_cancelled=True)
def detach_on_error(
    request: Any, exc: BaseException, traceback: Any, ctx: dict[str, Any]
) -> dict[str, Any]:
    """Errback: the VM failed in some step; it still ends detached, with the reason."""
    rt = runtime()
    if _is_verdict(exc):
        # The step worked and judged the guest: its reason is about the guest.
        reason = _message(exc)
    else:
        reason = (
            f"{getattr(request, 'task', 'a step')} failed on host {rt.host_id}: {_describe(exc)}"
        )
    _release(ctx)
    rt.jobs.fail(ctx["job_id"], reason)
    if "batch" in ctx:
        vm_finished(ctx)
    return {"job_id": ctx["job_id"], "ok": False, "error": reason}
