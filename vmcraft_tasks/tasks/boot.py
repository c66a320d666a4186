"""boot_check (options.boot_check): boot the migrated VM's disks headless and judge its
console; the VM ends here, `done` only when the boot passed.

The disks are booted as the domain XML describes them (firmware, machine, bus, NIC),
each `snapshot=on`, so the output is never written; there is no network. Under the
host's boot-check limit; qemu is killed by its pid on every way out, including a
cancel and a warm shutdown (the VM is then handed back), and by the reconciler when
this worker dies (`worker.bootchecks`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.craft.boot.check import BootCheckResult, check_guest
from vmcraft_tasks.models.context import VMResult
from vmcraft_tasks.models.plan import VMPlan
from vmcraft_tasks.outputs import write_serial_log
from vmcraft_tasks.tasks.runner import VMStep, context, end, plan
from worker.bootchecks import guarded_boot, stopped
from worker.runtime import HostRuntime, runtime

STEP = pipeline.step("boot_check")
_SETTINGS = app.conf.vmcraft_settings
# A VM may wait behind many checks for its host's place (one at a time by default, up
# to ten minutes each under TCG): the step gets the conversion's long time limits.
BOOT_WAIT_S = max(600.0, _SETTINGS.convert_time_limit_s - 1800.0)
EVIDENCE_IN_REASON = 3


def failure_reason(checked: BootCheckResult) -> str:
    """The VM's reason when its boot failed: the verdict and its deciding lines (pure)."""
    lines = "; ".join(checked.evidence[-EVIDENCE_IN_REASON:])
    text = f"boot check failed ({checked.reason}, {checked.mode}, {checked.accel})"
    return f"{text}: {lines}" if lines else text


def _skipped(why: str) -> dict[str, Any]:
    return {"result": "skipped", "mode": "none", "reason": why, "evidence": [], "notes": []}


@app.task(
    name=STEP.task,
    bind=True,
    base=VMStep,
    soft_time_limit=_SETTINGS.convert_time_limit_s - 60,
    time_limit=_SETTINGS.convert_time_limit_s,
)
def boot_check(self: VMStep, previous: dict[str, Any], message: dict[str, Any]) -> Any:
    rt = runtime()
    ctx = context(message)
    result = VMResult.model_validate(previous)
    vm = plan(rt, ctx)
    if result.data_only or not result.libvirt_xml:
        skipped = _skipped("a data-only VM has no domain of its own to boot")
        end(rt, ctx, "done", result=result.with_(boot_check=skipped).to_json())
        return {"job_id": ctx.job_id, "ok": True, "boot_check": "skipped"}
    rt.jobs.transition(ctx.job_id, jobs.BOOT_CHECKING)
    checked, console = _run(rt, ctx.job_id, vm, result.libvirt_xml)
    data = checked.to_dict()
    data["serial_log"] = None
    if console is not None:
        data["serial_log"] = write_serial_log(
            vm.to_dict(), console, settings_roots=rt.settings.output_roots
        )
    finished = result.with_(boot_check=data).to_json()
    self.progress(job_id=ctx.job_id, step="boot_checked", result=checked.result)
    if checked.result == "pass":
        end(rt, ctx, "done", result=finished)
        return {"job_id": ctx.job_id, "ok": True, "boot_check": "pass"}
    end(rt, ctx, "failed", reason=failure_reason(checked), result=finished)
    return {"job_id": ctx.job_id, "ok": False, "boot_check": checked.result}


def _run(
    rt: HostRuntime, job_id: str, vm: VMPlan, domain_xml: str
) -> tuple[BootCheckResult, str | None]:
    """The check and its cleaned console, in a scratch directory of this host's work
    dir (its path is in qemu's command line: what the reaper verifies before a kill)."""
    os.makedirs(rt.host_work_dir, mode=0o700, exist_ok=True)
    work = tempfile.mkdtemp(prefix="boot-", dir=rt.host_work_dir)
    try:
        with guarded_boot(rt, job_id, work, wait_s=BOOT_WAIT_S) as guard:
            checked = check_guest(
                [(disk.target, vm.target_format) for disk in vm.disks],
                domain_xml=Path(domain_xml).read_text(),
                work_dir=work,
                time_limit_s=float(rt.settings.boot_time_limit_s) or None,
                accel=rt.settings.boot_accel,
                should_stop=guard.should_stop,
                on_qemu=guard.on_qemu,
                settings=rt.craft_settings,
            )
            if guard.stopped is not None:
                raise stopped(guard)
        console = None
        if checked.serial_log and os.path.isfile(checked.serial_log):
            console = Path(checked.serial_log).read_text(errors="replace")
        return checked, console
    finally:
        shutil.rmtree(work, ignore_errors=True)
