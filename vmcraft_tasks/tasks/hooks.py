"""The checks the step runner makes before a step runs, in this order:

1. **redelivered**: the message came back (the reconciler restored it after its
   holder died, or its acknowledgement was lost with a broker connection). If this
   host's step ledger says the step already ran to its end, it is skipped; a step
   that may not run twice on a half-changed guest (`fix`), or one redelivered too
   often, ends its VM failed with the reason.
2. **stale**: the VM already ended, its record is gone (Redis restarted empty), it was
   handed to another host or back to the queue, or a newer start of it was sent:
   skipped.
3. **cancelled**: the VM was cancelled: it ends here (released, accounted, its batch
   moves on) instead of running the step.
"""

from __future__ import annotations

import logging

from vmcraft_tasks import jobs, pipeline
from vmcraft_tasks.migration import current_start_id
from vmcraft_tasks.models.context import MessageInvalid, StepContext
from vmcraft_tasks.tasks.runner import Ended, StepCall, before_step, end
from worker.steps import COMPLETED

log = logging.getLogger(__name__)

# A step whose message keeps coming back (its process keeps dying) ends its VM.
MAX_REDELIVERIES = 3


@before_step
def redelivered(call: StepCall) -> str | None:
    if not call.redelivered:
        return None
    task = call.task
    previous = call.rt.ledger.previous(task.name, call.task_id, call.retries)
    if previous is not None and previous.outcome in COMPLETED:
        return f"it already ran here ({previous.outcome})"
    if not call.job_id or previous is None:
        # It never started here (only reserved by a worker that died, or started on
        # another host): nothing half-done to worry about.
        return None
    count = call.rt.jobs.bump_progress(call.job_id, "redeliveries")
    reason = None
    if not task.rerunnable:
        reason = (
            f"{task.name} was interrupted on host {previous.host} (its worker process "
            "died) and is not run twice on a half-changed guest; resume the batch to "
            "start the VM again"
        )
    elif count > MAX_REDELIVERIES:
        reason = (
            f"{task.name} was interrupted {count} times (its worker process died "
            "each time); resume the batch to try again"
        )
    if reason is None:
        log.warning("%s %s redelivered (%d): running it again", task.name, call.task_id, count)
        return None
    _end(call, "failed", reason)
    raise Ended(reason, "failed")


@before_step
def stale(call: StepCall) -> str | None:
    if not call.job_id or call.task.runs_when_cancelled:
        return None
    status, host = call.status_and_host()
    if status is None:
        log.warning(
            "%s: the record of VM %s is gone (Redis lost it?); not running %s; the "
            "host's reconciler releases what the VM held",
            call.rt.host_id,
            call.job_id,
            call.task.name,
        )
        return "the VM's record is gone"
    if status in (jobs.DONE, jobs.FAILED):
        return f"the VM already ended ({status})"
    pinned = call.message.get("host")
    if pinned and (status == jobs.QUEUED or (host and host != pinned)):
        return f"the VM was handed on (now {status} on {host or 'no host'})"
    step = call.task.step
    batch, vm_id = call.message.get("batch"), call.message.get("vm_id")
    if (
        step is not None
        and step.name == pipeline.placing_step("migrate").name
        and isinstance(batch, str)
        and isinstance(vm_id, str)
    ):
        latest = current_start_id(call.rt.state, batch, vm_id)
        if latest is not None and latest != call.task_id:
            return "a newer start of this VM was sent"
    return None


@before_step
def cancelled(call: StepCall) -> str | None:
    if not call.job_id or call.task.runs_when_cancelled:
        return None
    status, _host = call.status_and_host()
    if status != jobs.CANCELLED:
        return None
    _end(call, "cancelled", "the VM was cancelled")
    raise Ended("the VM was cancelled: released and ended", "cancelled")


def _end(call: StepCall, outcome: str, reason: str) -> None:
    try:
        ctx = StepContext.from_message(call.message)
    except MessageInvalid:
        return
    end(call.rt, ctx, outcome, reason=reason)
