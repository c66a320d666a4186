"""fix: make the converted copy ready for KVM (fixes, initramfs, guest capabilities).

Ends the VM failed (GuestNotReadyError) when the tool knows the guest would not boot
as handed back; a data-only VM (options.os: none) needs no OS. Not rerunnable (see
the pipeline): a second run after a crash would work on a half-changed guest.
"""

from __future__ import annotations

import os
from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect_disk import describe_filesystems
from vmcraft_tasks.craft.prepare import GuestNotReadyError, Mode, prepare_guest
from vmcraft_tasks.models.context import VMResult
from vmcraft_tasks.models.plan import VMPlan
from vmcraft_tasks.tasks.runner import VMStep, context, plan, state_dir
from worker.runtime import runtime

STEP = pipeline.step("fix")


def fix_mode(vm: VMPlan) -> Mode:
    if not vm.fixes:
        return "off"
    return "dry_run" if vm.dry_run else "apply"


def os_root(result: VMResult) -> OSInfo:
    """The guest's OS root; a boot disk without one fails the VM, naming what it holds."""
    roots = [OSInfo.from_dict(root) for root in result.roots]
    if not roots:
        if result.no_root:
            raise GuestNotReadyError(
                f"{result.no_root}; declare options.os: none for a data-only VM"
            )
        mounts = {int(n): m for n, m in result.mounts.items()}
        disk = os.path.basename(str(result.image["path"]))
        raise GuestNotReadyError(
            f"no operating system found on the boot disk {disk} "
            f"({describe_filesystems(result.filesystems, mounts)}); "
            "declare options.os: none for a data-only VM"
        )
    return roots[0]


@app.task(name=STEP.task, bind=True, base=VMStep)
def fix(self: VMStep, previous: dict[str, Any], message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    result = VMResult.model_validate(previous)
    vm = plan(rt, ctx)
    if vm.os == "none":
        note = "data-only VM (options.os: none): no operating system expected, none fixed"
        return result.with_(data_only=True, fixes=[], fix_notes=[note]).to_json()
    root = os_root(result)
    rt.jobs.transition(ctx.job_id, jobs.FIXING)
    mode = fix_mode(vm)
    mounts = {int(n): m for n, m in result.mounts.items()}
    guest = GuestVM.resume(state_dir(rt, ctx), settings=rt.craft_settings, cache=rt.cache)
    try:
        found = guest.scan()
        tree_notes = guest.mount_guest_tree(root, mounts)
        prep = prepare_guest(
            mounts[root.root_partition].mountpoint,
            root,
            result.filesystems,
            result.partitions,
            mode=mode,
            volumes=found.volumes,
            lvs=found.lvs,
        )
        if mode == "apply" and ((prep.fixes is not None and prep.fixes.changed) or prep.initramfs):
            # The disks changed (a fix lands on whichever holds the file): cached scans
            # of any of them, LVM layouts included, must not be served again.
            guest.invalidate_scan_cache()
    finally:
        guest.forget()
    data = prep.to_dict()
    fixes = data["fixes"] or {}
    notes = [*tree_notes, *fixes.get("notes", []), *prep.notes]
    if len(result.roots) > 1:
        where = found.volumes.get(root.root_partition)
        label = where.label if where else f"partition {root.root_partition}"
        notes.append(f"{len(result.roots)} OS roots found: prepared the one on {label}")
    if prep.problem:
        raise GuestNotReadyError(prep.problem)
    self.progress(job_id=ctx.job_id, step="fixed", fixes=len(fixes.get("applied", [])))
    return result.with_(
        fixes=fixes.get("applied", []),
        fix_notes=notes,
        fix_skipped=fixes.get("skipped", []),
        preparation=data,
        guestcaps=data["guestcaps"],
    ).to_json()
