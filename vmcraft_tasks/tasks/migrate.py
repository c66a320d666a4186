"""The migration steps around inspection: start, convert, fix, finalize.

start (intake, or the pinned host) -> convert each disk -> attach the converted
boot disk (write mode unless dry run) -> scan -> chord(mount) -> inspect -> fix
-> detach -> finalize (libvirt XML, JSON report, next VM of the batch)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from vmcraft_tasks import conversions, jobs, outputs, policy
from vmcraft_tasks.batches import BatchStore
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.convert import SourceChangedError, convert_image
from vmcraft_tasks.craft.images import ImageInfo, probe_image
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect_disk import describe_filesystems
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.prepare import GuestNotReadyError, Mode, prepare_guest
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.migration import vm_ended
from vmcraft_tasks.outfiles import OutputError
from vmcraft_tasks.outputs import write_domain_xml, write_vm_report
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue, pin
from vmcraft_tasks.tasks.base import VMStep
from vmcraft_tasks.tasks.vm import attach, detach_on_error
from worker.conversions import guarded_conversion, safe_progress
from worker.runtime import runtime

log = logging.getLogger(__name__)

HOST_FULL_RETRY_S = 0.5
HOST_FULL_MAX_RETRIES = 7200
CONVERSION_WAIT_S = 6 * 3600.0
PROGRESS_STEP_PCT = 2.0


@app.task(name="vmcraft.vm.start", bind=True, base=VMStep, max_retries=HOST_FULL_MAX_RETRIES)
def start(self: VMStep, ctx: dict[str, Any]) -> Any:
    """Place the VM on this host (pin, group, free slot) and start converting it here."""
    rt = runtime()
    try:
        plan = policy.plan_of(rt, ctx)
    except policy.MessageRefused as exc:
        return _refuse_vm(rt, ctx, exc)
    job_id = ctx["job_id"]
    pinned = plan.get("host")
    group = plan.get("host_group") or []
    if pinned and pinned != rt.host_id:
        raise self.retry(countdown=0, queue=host_queue(pinned))
    if group and rt.host_id not in group:
        # Not one of ours: back to the shared queue for a host of the group.
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=INTAKE_QUEUE)
    if rt.leases.acquire(job_id) is None:
        # Full: wait, rather than overload this host (pinned VMs wait for their host).
        queue = host_queue(pinned) if pinned else INTAKE_QUEUE
        raise self.retry(countdown=HOST_FULL_RETRY_S, queue=queue)
    if not rt.jobs.transition(job_id, jobs.CONVERTING, host=rt.host_id):
        rt.leases.release(job_id)
        return {"job_id": job_id, "ok": False, "error": "job already ended"}
    rt.jobs.set_progress(job_id, worker_pid=rt.worker_pid, started_at=time.time())
    ctx = {**ctx, "host": rt.host_id}
    raise self.replace(pin(convert.si(ctx).on_error(detach_on_error.s(ctx)), rt.host_id))


_SETTINGS = app.conf.vmcraft_settings


@app.task(
    name="vmcraft.vm.convert",
    bind=True,
    base=VMStep,
    soft_time_limit=_SETTINGS.convert_time_limit_s - 60,
    time_limit=_SETTINGS.convert_time_limit_s,
)
def convert(self: VMStep, ctx: dict[str, Any]) -> Any:
    """Convert every disk under the host's conversion limit, then attach the boot disk."""
    rt = runtime()
    try:
        plan = policy.plan_of(rt, ctx)
    except policy.MessageRefused as exc:
        return _refuse_vm(rt, ctx, exc)
    job_id = ctx["job_id"]
    own = rt.settings.output_roots
    outputs.check_vm_outputs(plan, settings_roots=own)
    roots = outputs.vm_output_roots(plan, settings_roots=own)
    results = []
    for index, disk in enumerate(plan["disks"]):
        done = conversions.already_converted(disk["source"], disk["target"], roots)
        if done is not None:
            results.append({**done.conversion, "skipped": "already converted"})
            continue
        last = [-PROGRESS_STEP_PCT]

        def report(pct: float, index: int = index, last: list[float] = last) -> None:
            if pct - last[0] >= PROGRESS_STEP_PCT or pct >= 100.0:
                last[0] = pct
                rt.jobs.set_progress(job_id, convert_disk=index, convert_pct=round(pct, 1))
                self.progress(job_id=job_id, step="converting", disk=index, pct=round(pct, 1))

        def copy(staged: str, disk: dict[str, Any] = disk, report: Any = report) -> Any:
            checked = _source_as_submitted(disk, rt.craft_settings)
            return convert_image(
                disk["source"],
                staged,
                timeout_s=_SETTINGS.convert_time_limit_s - 120,
                target_format=plan["target_format"],
                progress=safe_progress(report),
                overwrite=False,
                settings=rt.craft_settings,
                expected=checked,
            ).to_dict()

        # The guard stops the copy at a warm shutdown or when the VM ends meanwhile,
        # and records qemu-img's temporary file so a dead worker's copy is cleaned up.
        with guarded_conversion(rt, job_id, index, disk["target"], wait_s=CONVERSION_WAIT_S):
            marker = conversions.convert_confined(disk["source"], disk["target"], roots, copy)
        results.append(marker.conversion)
    rt.jobs.set_progress(job_id, conversions=results, convert_pct=100.0)
    # attach derives the image and write mode from the batch's record, not from here.
    next_ctx = {**ctx, "conversions": results}
    raise self.replace(pin(attach.si(next_ctx), ctx["host"]))


def _source_as_submitted(disk: dict[str, Any], settings: Any) -> ImageInfo:
    """Check the source again now; a source that is no longer what was submitted (a
    raw disk truncated, say: nothing in it records its size) fails the VM."""
    info = probe_image(disk["source"], settings=settings)
    submitted = disk.get("virtual_size")
    if submitted and info.virtual_size != submitted:
        raise SourceChangedError(
            disk["source"],
            disk["target"],
            f"its virtual size changed from {submitted} to {info.virtual_size} bytes "
            "since the batch was submitted",
        )
    if disk.get("format") and info.format != disk["format"]:
        raise SourceChangedError(
            disk["source"],
            disk["target"],
            f"it is now a {info.format} image, it was {disk['format']} when submitted",
        )
    return info


def _fix_mode(plan: dict[str, Any]) -> Mode:
    if not plan["fixes"]:
        return "off"
    return "dry_run" if plan["dry_run"] else "apply"


def _os_root(report: dict[str, Any], filesystems: list[Filesystem]) -> OSInfo:
    """The guest's OS root; a boot disk without one fails the VM, naming what it holds."""
    roots = [OSInfo.from_dict(root) for root in report["roots"]]
    if not roots:
        mounts = {int(n): _mount_result(m) for n, m in report["mounts"].items()}
        disk = os.path.basename(report["image"]["path"])
        raise GuestNotReadyError(
            f"no operating system found on the boot disk {disk} "
            f"({describe_filesystems(filesystems, mounts)}); "
            "declare options.os: none for a data-only VM"
        )
    return roots[0]


def _mount_result(data: dict[str, Any]) -> MountResult:
    return MountResult(**{k: v for k, v in data.items() if k != "partition"})


# Not rerunnable: a second run after a crash would work on a half-changed guest.
@app.task(name="vmcraft.vm.fix", bind=True, base=VMStep, rerunnable=False)
def fix(self: VMStep, report: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Make the converted copy ready for KVM: fixes, initramfs, guest capabilities.

    Ends the VM failed (GuestNotReadyError) when the tool knows the guest would not
    boot as handed back; a data-only VM (options.os: none) needs no OS.
    """
    rt = runtime()
    plan = policy.plan_of(rt, ctx)
    filesystems = [Filesystem.from_dict(f) for f in ctx["filesystems"]]
    if plan.get("os") == "none":
        note = "data-only VM (options.os: none): no operating system expected, none fixed"
        return {**report, "data_only": True, "fixes": [], "fix_notes": [note]}
    root = _os_root(report, filesystems)
    rt.jobs.transition(ctx["job_id"], jobs.FIXING)
    parts = [Partition.from_dict(p) for p in ctx["partitions"]]
    mode = _fix_mode(plan)
    mounts = {int(n): _mount_result(m) for n, m in report["mounts"].items()}
    g = VMCraft.resume(policy.state_dir_for(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        tree_notes = g.mount_guest_tree(root, mounts)
        prep = prepare_guest(
            mounts[root.root_partition].mountpoint, root, filesystems, parts, mode=mode
        )
        if mode == "apply" and ((prep.fixes is not None and prep.fixes.changed) or prep.initramfs):
            # The disk changed: cached scans of it must not be served again.
            g.cache.bump_generation(g.image.identity)
    finally:
        g.forget()
    data = prep.to_dict()
    fixes = data["fixes"] or {}
    notes = [*tree_notes, *fixes.get("notes", []), *prep.notes]
    if len(report["roots"]) > 1:
        notes.append(
            f"{len(report['roots'])} OS roots found: prepared the one on partition "
            f"{root.root_partition}"
        )
    if prep.problem:
        raise GuestNotReadyError(prep.problem)
    self.progress(job_id=ctx["job_id"], step="fixed", fixes=len(fixes.get("applied", [])))
    return {
        **report,
        "fixes": fixes.get("applied", []),
        "fix_notes": notes,
        "fix_skipped": fixes.get("skipped", []),
        "preparation": data,
        "guestcaps": data["guestcaps"],
    }


@app.task(name="vmcraft.vm.finalize", bind=True, base=VMStep)
def finalize(self: VMStep, report: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """libvirt domain XML and the VM's JSON report; the VM is done; the batch moves on.

    Only a guest that `fix` judged ready gets here (or a declared data-only VM).
    """
    rt = runtime()
    plan = policy.plan_of(rt, ctx)
    # A data-only VM has nothing to boot: its disks are attached to another domain.
    own = rt.settings.output_roots
    xml_path = (
        None if report.get("data_only") else write_domain_xml(plan, report, settings_roots=own)
    )
    report = {**report, "libvirt_xml": xml_path, "conversions": ctx.get("conversions", [])}
    rt.jobs.transition(ctx["job_id"], jobs.DONE, result=report)
    end_batch_vm(ctx)
    return {"job_id": ctx["job_id"], "ok": True, "libvirt_xml": xml_path}


def end_batch_vm(ctx: dict[str, Any]) -> None:
    """Write the VM's report (done or failed) and release its place in the batch.

    The report goes where the batch's own record (not the message) says, and only
    if that is inside this host's output roots.
    """
    rt = runtime()
    try:
        vm = policy.plan_of(rt, ctx)
    except policy.MessageRefused as exc:
        log.warning("no report for %s: %s", ctx.get("job_id"), exc)
        vm = None
    if vm is not None:
        record = rt.jobs.get(ctx["job_id"])
        try:
            write_vm_report(
                vm, record, rt.jobs.steps(ctx["job_id"]), settings_roots=rt.settings.output_roots
            )
        except OutputError as exc:
            log.warning("no report for %s: %s", ctx.get("job_id"), exc)
    if policy.names_batch_vm(ctx):
        vm_ended(app, BatchStore(rt.state), rt.jobs, ctx["batch"], ctx["vm_id"])


def _refuse_vm(rt: Any, ctx: dict[str, Any], exc: policy.MessageRefused) -> dict[str, Any]:
    """This host will not run the VM as asked: it fails, with why, and the batch goes on."""
    log.warning("refused %s: %s", ctx.get("job_id"), exc)
    try:
        job_id = policy.job_id_of(ctx)
    except policy.MessageRefused:
        return {"ok": False, "error": f"refused: {exc}"}
    if policy.names_batch_vm(ctx):
        rt.jobs.fail(job_id, f"refused by host {rt.host_id}: {exc}")
        end_batch_vm(ctx)
    return {"job_id": job_id, "ok": False, "error": f"refused: {exc}"}
