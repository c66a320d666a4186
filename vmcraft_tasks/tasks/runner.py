"""The step runner: what every VM step shares. Timing, one log line per outcome,
progress in Flower, the host's step ledger, and the hooks that decide before a step
runs whether it should run at all.

Hooks (`before_step`) are registered by `vmcraft_tasks.tasks.hooks`: skip a
redelivery that already ran here, end a VM whose step may not run twice, skip a step
of a VM that ended or was handed on, end a cancelled VM. A hook returns None (go on)
or the reason the step does not run; a hook that ended the VM says so with `Ended`.
The runner knows none of them by name.

What a step raises is handled here too, the same way for every step:
- `MessageRefused` / `MessageInvalid` (the message asks for what this host's policy
  does not allow, or is not a VM message): the VM fails with why, nothing is done;
- `ConversionStopped` (a conversion stopped on purpose, nothing half-done): the VM is
  handed back to the queue (warm shutdown) or ends cancelled/failed.
While it runs, the step is recorded in the host's step ledger (`worker.steps`): the
reconciler tells a live step from a dead one by that record and its process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Retry

from vmcraft_tasks import pipeline, policy
from vmcraft_tasks.batches import BatchStore
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.migration import requeue_vm
from vmcraft_tasks.models.context import MessageInvalid, StepContext
from vmcraft_tasks.models.plan import VMPlan
from worker.conversions import ConversionStopped
from worker.ending import end_vm, release
from worker.procs import start_ticks
from worker.runtime import HostRuntime, runtime
from worker.steps import StepRecord, holding

log = logging.getLogger("vmcraft_tasks.tasks")

# A placing step that finds its host full sends the VM back to a queue this soon, for
# an hour at most before the VM fails.
HOST_FULL_RETRY_S = 0.5
HOST_FULL_MAX_RETRIES = 7200

# Margin over the step's time limit before the reconciler calls a live step overdue.
DEADLINE_MARGIN_S = 60.0

_pid_start: tuple[int, int | None] | None = None


def _my_start_ticks() -> int | None:
    global _pid_start
    pid = os.getpid()
    if _pid_start is None or _pid_start[0] != pid:  # recomputed after a fork
        _pid_start = (pid, start_ticks(pid))
    return _pid_start[1]


@dataclass
class StepCall:
    """One delivery of a step, as the hooks see it."""

    task: VMStep
    rt: HostRuntime
    message: dict[str, Any]
    task_id: str
    retries: int
    redelivered: bool
    _status: tuple[str | None, str | None] | None = field(default=None, repr=False)

    @property
    def job_id(self) -> str:
        job_id = self.message.get("job_id")
        return job_id if isinstance(job_id, str) else ""

    def status_and_host(self) -> tuple[str | None, str | None]:
        """The VM's state and host, read once per delivery."""
        if self._status is None:
            self._status = self.rt.jobs.status_and_host(self.job_id)
        return self._status


class Ended(Exception):
    """A hook ended the VM; the step does not run. `outcome` goes to the ledger."""

    def __init__(self, reason: str, outcome: str) -> None:
        self.reason = reason
        self.outcome = outcome
        super().__init__(reason)


Hook = Callable[[StepCall], str | None]
_HOOKS: list[Hook] = []


def before_step(hook: Hook) -> Hook:
    """Register a hook; hooks run in registration order before every step."""
    _HOOKS.append(hook)
    return hook


def hooks() -> tuple[Hook, ...]:
    return tuple(_HOOKS)


class VMStep(Task):  # type: ignore[misc]
    """Base for VM steps. Retry policy lives here, not in each task."""

    abstract = True
    # Step failures are facts about one VM, reported in its job record; a retry
    # would only repeat them. Host-full retries are explicit where a VM is placed.
    max_retries = 0
    # Only the errback runs for a cancelled VM: it is how it ends cleanly.
    runs_when_cancelled = False

    @property
    def step(self) -> pipeline.Step | None:
        return pipeline.step_of_task(self.name)

    @property
    def rerunnable(self) -> bool:
        step = self.step
        return step.rerunnable if step is not None else True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        rt = runtime()
        started = time.perf_counter()
        started_at = time.time()
        call = StepCall(
            task=self,
            rt=rt,
            message=_message(args),
            task_id=str(self.request.id or ""),
            retries=int(self.request.retries or 0),
            redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
        )
        outcome = "failed"
        record: StepRecord | None = None
        try:
            for hook in _HOOKS:
                reason = hook(call)
                if reason is not None:
                    log.info("%s %s skipped: %s", self.name, call.task_id, reason)
                    outcome = "skipped"
                    raise Ignore()
            record = self._begin(call)
            with holding(record.holder):
                result = super().__call__(*args, **kwargs)
            outcome = "done"
            return result
        except Ended as ended:
            outcome = ended.outcome
            log.info("%s %s: %s", self.name, call.task_id, ended.reason)
            raise Ignore() from None
        except Retry:
            outcome = "retry"  # e.g. the host was full: the VM went back to a queue
            raise
        except ConversionStopped as stop:
            outcome = "stopped"
            log.warning("%s of %s stopped: %s", self.name, call.job_id, stop.reason)
            return hand_back(rt, call.message, stop)
        except (policy.MessageRefused, MessageInvalid) as exc:
            return refuse(rt, call.message, exc)
        except Ignore:
            if outcome == "failed":
                outcome = "replaced"  # the step handed the VM on to its next steps
            raise
        except Exception as exc:
            log.warning("%s failed after %.1f ms: %s", self.name, _ms(started), exc)
            raise
        finally:
            log.info("%s %s in %.1f ms", self.name, outcome, _ms(started))
            if record is not None:
                rt.ledger.end(record, outcome)
            if outcome != "skipped":
                self._record(call.job_id, outcome, started_at)

    def _begin(self, call: StepCall) -> StepRecord:
        record = StepRecord(
            task_id=call.task_id,
            retries=call.retries,
            task=self.name,
            job_id=call.job_id,
            host=call.rt.host_id,
            pid=os.getpid(),
            pid_start=_my_start_ticks(),
            worker_pid=call.rt.worker_pid,
            started=time.time(),
            deadline=time.time() + self._time_limit() + DEADLINE_MARGIN_S,
        )
        call.rt.ledger.begin(record)
        return record

    def _time_limit(self) -> float:
        limit = self.time_limit or self.app.conf.task_time_limit or 3600
        return float(limit)

    def _record(self, job_id: str, outcome: str, started: float) -> None:
        if not job_id:
            return
        rt = runtime()
        try:
            rt.jobs.record_step(
                job_id,
                self.name,
                rt.host_id,
                self.request.id or "",
                outcome,
                int(self.request.retries or 0),
                started=started,
            )
        except redis.RedisError as exc:
            # The host's own step ledger has the fact; Redis only loses a report line.
            log.warning("could not record %s of %s in Redis: %s", self.name, job_id, exc)

    def progress(self, **meta: Any) -> None:
        """A custom state Flower shows while the step runs."""
        if self.request.id and not self.request.called_directly:
            self.update_state(state="PROGRESS", meta=meta)


def context(message: Any) -> StepContext:
    """The step's VM context from its message (refused when it is not one)."""
    return StepContext.from_message(message)


def state_dir(rt: HostRuntime, ctx: StepContext) -> str:
    """The VM's attach state directory on this host, checked to be one made for it."""
    return policy.state_dir_for(rt, ctx.to_message())


def plan(rt: HostRuntime, ctx: StepContext) -> VMPlan:
    """The VM's plan as the batch record holds it, checked against this host's roots."""
    return VMPlan.from_dict(policy.plan_of(rt, ctx.to_message()))


def flow(rt: HostRuntime, ctx: StepContext) -> pipeline.Flow:
    """The VM's flow: a lone image is inspected; a batch VM's plan says the rest."""
    return pipeline.flow_of(plan(rt, ctx).to_dict()) if ctx.in_batch else "inspect"


def step_options(rt: HostRuntime, ctx: StepContext) -> dict[str, bool]:
    """The VM's options that switch optional steps on, from its trusted plan."""
    return plan(rt, ctx).step_options() if ctx.in_batch else {}


def end(
    rt: HostRuntime,
    ctx: StepContext,
    outcome: Any,
    *,
    reason: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """End the VM from one of its steps on its host: release what it holds here
    (its attach, when this host made it for the job), account, report, move on."""
    return end_vm(
        app,
        rt.state,
        ctx.job_id,
        outcome,
        rt,
        reason=reason,
        result=result,
        state_dir=attached_dir(rt, ctx),
    )


def attached_dir(rt: HostRuntime, ctx: StepContext) -> str | None:
    """The VM's attach on this host if it is still there and was made for it (None:
    detached already, or not this host's to release)."""
    if not ctx.state_dir or not os.path.isdir(ctx.state_dir):
        return None
    try:
        return state_dir(rt, ctx)
    except policy.MessageRefused as exc:
        # Not an attach this host made for this job: nothing of it is released.
        log.warning("not releasing %s: %s", ctx.state_dir, exc)
        return None


def refuse(rt: HostRuntime, message: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """A message this host will not act on: its job (if it names a real one) fails, with
    why, and a batch VM's batch goes on. Nothing of this host is released: the message
    may be a forgery naming someone else's VM."""
    log.warning("refused a step message: %s", exc)
    try:
        job_id = policy.job_id_of(message)
    except policy.MessageRefused:
        return {"ok": False, "error": f"refused: {exc}"}
    end_vm(app, rt.state, job_id, "failed", reason=f"refused by host {rt.host_id}: {exc}")
    return {"job_id": job_id, "ok": False, "error": f"refused: {exc}"}


def hand_back(rt: HostRuntime, message: dict[str, Any], stop: ConversionStopped) -> dict[str, Any]:
    """A conversion stopped resumably: the VM holds nothing on this host but its slot."""
    ctx = context(message)
    job_id = ctx.job_id
    if stop.kind == "cancelled":
        end(rt, ctx, "cancelled")
        return {"job_id": job_id, "ok": False, "error": stop.reason}
    release(rt, job_id)
    if stop.kind != "shutdown":
        return {"job_id": job_id, "ok": False, "error": stop.reason}
    note = f"{stop.reason}; handed back to the queue (resumable)"
    if ctx.batch is not None and ctx.vm_id is not None:
        store = BatchStore(rt.state)
        if requeue_vm(app, store, rt.jobs, ctx.batch, ctx.vm_id, note=note):
            return {"job_id": job_id, "ok": False, "requeued": note}
    reason = f"{stop.reason}; resume the batch to convert it again"
    end(rt, ctx, "failed", reason=reason)
    return {"job_id": job_id, "ok": False, "error": reason}


def _message(args: tuple[Any, ...]) -> dict[str, Any]:
    """Steps take the VM's context (a dict with `job_id`) among their arguments; the
    last such dict is the context (a result before it also names the job)."""
    found: dict[str, Any] = {}
    for arg in args:
        if isinstance(arg, dict) and isinstance(arg.get("job_id"), str):
            found = arg
    return found


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
