"""The end of a VM's pipeline: detach, finalize, and the errback of every host step.

All three end the VM through `worker.ending.end_vm` (by way of `runner.end`):
released, accounted, reported, next VM of the batch started.
"""

from __future__ import annotations

import logging
from typing import Any

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.models.context import VMResult
from vmcraft_tasks.outputs import write_domain_xml
from vmcraft_tasks.tasks.runner import VMStep, attached_dir, context, end, plan
from worker.ending import release
from worker.runtime import runtime

log = logging.getLogger(__name__)

DETACH = pipeline.step("detach")
FINALIZE = pipeline.step("finalize")

# Errors that are a verdict on the guest, not a crash of the step that raised them.
VERDICT_ERRORS = frozenset({"GuestNotReadyError"})


@app.task(name=DETACH.task, bind=True, base=VMStep)
def detach(self: VMStep, previous: dict[str, Any], message: dict[str, Any]) -> Any:
    """Unmount and detach the VM's disks here, and give its slot back."""
    rt = runtime()
    ctx = context(message)
    rt.jobs.transition(ctx.job_id, jobs.DETACHING)
    release(rt, ctx.job_id, attached_dir(rt, ctx))
    return previous


@app.task(name=FINALIZE.task, bind=True, base=VMStep)
def finalize(self: VMStep, previous: dict[str, Any], message: dict[str, Any]) -> Any:
    """A migrated VM's libvirt domain XML; then the VM is done, unless a boot check
    follows (options.boot_check), which then ends it.

    Only a guest that `fix` judged ready gets here (or a declared data-only VM, whose
    disks belong to another domain, or a lone inspection): those get no domain.
    """
    rt = runtime()
    ctx = context(message)
    result = VMResult.model_validate(previous)
    xml_path = None
    if ctx.in_batch:
        vm = plan(rt, ctx)
        if not result.data_only:
            xml_path = write_domain_xml(
                vm.to_dict(), result.to_json(), settings_roots=rt.settings.output_roots
            )
        result = result.with_(libvirt_xml=xml_path, conversions=ctx.conversions)
        if pipeline.after(FINALIZE.name, pipeline.flow_of(vm.to_dict()), vm.step_options()):
            return result.to_json()  # the next step (the boot check) ends the VM
    end(rt, ctx, "done", result=result.to_json())
    return {"job_id": ctx.job_id, "ok": True, "libvirt_xml": xml_path}


def _name(exc: BaseException) -> str:
    # An exception Celery could not serialise arrives wrapped; unwrap its name.
    return str(getattr(exc, "exc_cls_name", None) or type(exc).__name__)


def _message(exc: BaseException) -> str:
    """The exception's own message; Celery may hand errbacks a rebuilt exception whose
    str() is a repr."""
    args = getattr(exc, "exc_args", None) or exc.args
    return args[0] if args and isinstance(args[0], str) else str(exc)


def failure_reason(exc: BaseException, task: str, host: str) -> str:
    """A verdict on the guest is the reason as it stands; a crash names its step."""
    if _name(exc) in VERDICT_ERRORS:
        return _message(exc)
    return f"{task} failed on host {host}: {_name(exc)}: {_message(exc)}"


# Not bound: Celery passes (request, exc, traceback) only to unbound errback tasks,
# and runs them right away in the worker process where the step failed.
@app.task(name=pipeline.FAILED_TASK, base=VMStep, runs_when_cancelled=True)
def detach_on_error(
    request: Any, exc: BaseException, traceback: Any, message: dict[str, Any]
) -> dict[str, Any]:
    """Errback: the VM failed in some step; it still ends detached, with the reason."""
    rt = runtime()
    ctx = context(message)
    reason = failure_reason(exc, getattr(request, "task", None) or "a step", rt.host_id)
    end(rt, ctx, "failed", reason=reason)
    return {"job_id": ctx.job_id, "ok": False, "error": reason}
