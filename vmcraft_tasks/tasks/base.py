"""What every VM step shares: timing, one log line per outcome, progress in Flower, and
the bookkeeping that lets a host recover from a dead step or a lost broker.

Before a step runs, `VMStep` decides whether it should run at all:

- its VM was cancelled: release what it holds and end it (as before);
- its VM already ended, its record is gone (Redis restarted empty), or the VM was
  handed to another host or back to the queue meanwhile: the step is skipped;
- the message is a redelivery (the reconciler restored it after its holder died, or
  its acknowledgement was lost with a broker connection) and this host's step
  ledger says the step already ran to its end: skipped, so no step runs twice;
- a redelivered step that may not run twice on a half-changed guest (`fix`), or a
  step redelivered too often, ends its VM failed with the reason.

A step whose work was stopped on purpose and left nothing half-done (a conversion at
a warm shutdown: `worker.conversions.ConversionStopped`) hands its VM back: to the
queue, to start again on any host, or cancelled/failed when that is what stopped it.

While it runs, the step is recorded in the host's step ledger (`worker.steps`): the
reconciler tells a live step from a dead one by that record and its process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Retry

from vmcraft_tasks import jobs

log = logging.getLogger("vmcraft_tasks.tasks")

START_TASK = "vmcraft.vm.start"
# A step whose message keeps coming back (its process keeps dying) ends its VM.
MAX_REDELIVERIES = 3
# Margin over the step's time limit before the reconciler calls a live step overdue.
DEADLINE_MARGIN_S = 60.0

_pid_start: tuple[int, int | None] | None = None


def _my_start_ticks() -> int | None:
    global _pid_start
    pid = os.getpid()
    if _pid_start is None or _pid_start[0] != pid:  # recomputed after a fork
        from worker.procs import start_ticks

        _pid_start = (pid, start_ticks(pid))
    return _pid_start[1]


class StepInterrupted(Exception):
    """A step was interrupted in a way that makes running it again unsafe or futile."""


class VMStep(Task):  # type: ignore[misc]
    """Base for VM steps. Retry policy lives here, not in each task."""

    abstract = True
    # Step failures are facts about one VM, reported in its job record; a retry
    # would only repeat them. Host-full retries are explicit in `attach`.
    max_retries = 0

    # Steps that must run even for a cancelled VM: they are how it ends cleanly.
    runs_when_cancelled = False
    # False: a second run after the first one died mid-way could do harm (the fix
    # step edits the converted guest); such a redelivery fails the VM instead.
    rerunnable = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        from worker.conversions import ConversionStopped
        from worker.runtime import runtime
        from worker.steps import StepRecord, holding

        rt = runtime()
        started = time.perf_counter()
        ctx = _context(args)
        job_id = str(ctx.get("job_id") or "")
        task_id = str(self.request.id or "")
        retries = int(self.request.retries or 0)
        skip, status = self._skip_reason(rt, ctx, task_id, retries)
        if skip is not None:
            log.info("%s %s skipped: %s", self.name, task_id, skip)
            raise Ignore()
        record = StepRecord(
            task_id=task_id,
            retries=retries,
            task=self.name,
            job_id=job_id,
            host=rt.host_id,
            pid=os.getpid(),
            pid_start=_my_start_ticks(),
            worker_pid=rt.worker_pid,
            started=time.time(),
            deadline=time.time() + self._time_limit() + DEADLINE_MARGIN_S,
        )
        rt.ledger.begin(record)
        outcome = "failed"
        try:
            with holding(record.holder):
                if not self.runs_when_cancelled and status == jobs.CANCELLED:
                    outcome = "cancelled"
                    from vmcraft_tasks.tasks.vm import release_cancelled

                    release_cancelled(ctx)
                    raise Ignore()
                result = super().__call__(*args, **kwargs)
            outcome = "done"
            return result
        except Retry:
            outcome = "retry"  # e.g. the host was full: the VM went back to the intake queue
            raise
        except ConversionStopped as stop:
            outcome = "stopped"
            log.warning("%s of %s stopped: %s", self.name, job_id, stop.reason)
            return _hand_back(ctx, stop)
        except Ignore:
            if outcome != "cancelled":
                outcome = "replaced"  # the step handed the VM on to its next steps
            raise
        except Exception as exc:
            log.warning("%s failed after %.1f ms: %s", self.name, _ms(started), exc)
            raise
        finally:
            log.info("%s %s in %.1f ms", self.name, outcome, _ms(started))
            rt.ledger.end(record, outcome)
            self._record(job_id, outcome)

    def _time_limit(self) -> float:
        limit = self.time_limit or self.app.conf.task_time_limit or 3600
        return float(limit)

    def _skip_reason(
        self, rt: Any, ctx: dict[str, Any], task_id: str, retries: int
    ) -> tuple[str | None, str | None]:
        """Why this delivery must not run (None: run it), and the VM's state as read.
        See the module doc."""
        job_id = str(ctx.get("job_id") or "")
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        if redelivered:
            reason = self._redelivery(rt, ctx, task_id, retries)
            if reason is not None:
                return reason, None
        if not job_id or self.runs_when_cancelled:
            return None, None
        status, host = rt.jobs.status_and_host(job_id)
        verdict = self._verdict(rt, ctx, task_id=task_id, job_id=job_id, status=status, host=host)
        return verdict, status

    def _verdict(
        self,
        rt: Any,
        ctx: dict[str, Any],
        *,
        task_id: str,
        job_id: str,
        status: str | None,
        host: str | None,
    ) -> str | None:
        if status is None:
            log.warning(
                "%s: the record of VM %s is gone (Redis lost it?); not running %s; the "
                "host's reconciler releases what the VM held",
                rt.host_id,
                job_id,
                self.name,
            )
            return "the VM's record is gone"
        if status in (jobs.DONE, jobs.FAILED):
            return f"the VM already ended ({status})"
        pinned = ctx.get("host")
        if pinned and (status == jobs.QUEUED or (host and host != pinned)):
            return f"the VM was handed on (now {status} on {host or 'no host'})"
        if self.name == START_TASK and ctx.get("batch") and not _current_attempt(rt, ctx, task_id):
            return "a newer start of this VM was sent"
        return None

    def _redelivery(self, rt: Any, ctx: dict[str, Any], task_id: str, retries: int) -> str | None:
        """A redelivered message: skip it if it already ran here; end the VM if running
        it again is unsafe or it keeps coming back."""
        from worker.steps import COMPLETED

        previous = rt.ledger.previous(self.name, task_id, retries)
        if previous is not None and previous.outcome in COMPLETED:
            return f"it already ran here ({previous.outcome})"
        job_id = str(ctx.get("job_id") or "")
        if not job_id:
            return None
        if previous is None:
            # It never started here (only reserved by a worker that died, or started on
            # another host): nothing half-done to worry about.
            return None
        count = rt.jobs.bump_progress(job_id, "redeliveries")
        reason = None
        if not self.rerunnable:
            reason = (
                f"{self.name} was interrupted on host {previous.host} (its worker process "
                "died) and is not run twice on a half-changed guest; resume the batch to "
                "start the VM again"
            )
        elif count > MAX_REDELIVERIES:
            reason = (
                f"{self.name} was interrupted {count} times (its worker process died "
                "each time); resume the batch to try again"
            )
        if reason is None:
            log.warning("%s %s redelivered (%d): running it again", self.name, task_id, count)
            return None
        _end_interrupted(ctx, reason)
        return reason

    def _record(self, job_id: str, outcome: str) -> None:
        if not job_id:
            return
        from worker.runtime import runtime

        rt = runtime()
        try:
            rt.jobs.record_step(
                job_id,
                self.name,
                rt.host_id,
                self.request.id or "",
                outcome,
                int(self.request.retries or 0),
            )
        except redis.RedisError as exc:
            # The host's own step ledger has the fact; Redis only loses a report line.
            log.warning("could not record %s of %s in Redis: %s", self.name, job_id, exc)

    def progress(self, **meta: Any) -> None:
        """A custom state Flower shows while the step runs."""
        if self.request.id and not self.request.called_directly:
            self.update_state(state="PROGRESS", meta=meta)


def _current_attempt(rt: Any, ctx: dict[str, Any], task_id: str) -> bool:
    """Is this start message the VM's latest (a requeue sends a new one)?"""
    from vmcraft_tasks.migration import current_start_id

    latest = current_start_id(rt.state, str(ctx["batch"]), str(ctx.get("vm_id") or ""))
    return latest is None or latest == task_id


def _hand_back(ctx: dict[str, Any], stop: Any) -> dict[str, Any]:
    """A conversion stopped resumably: the VM holds nothing on this host but its slot."""
    from vmcraft_tasks.tasks.vm import release_cancelled, vm_finished
    from worker.runtime import runtime

    rt = runtime()
    job_id = str(ctx["job_id"])
    if stop.kind == "cancelled":
        release_cancelled(ctx)
        return {"job_id": job_id, "ok": False, "error": stop.reason}
    rt.leases.release(job_id)
    if stop.kind != "shutdown":
        return {"job_id": job_id, "ok": False, "error": stop.reason}
    note = f"{stop.reason}; handed back to the queue (resumable)"
    if "plan" in ctx:
        from vmcraft_tasks.batches import BatchStore
        from vmcraft_tasks.celery_app import app
        from vmcraft_tasks.migration import requeue_vm

        store = BatchStore(rt.state)
        if requeue_vm(app, store, rt.jobs, str(ctx["batch"]), str(ctx["vm_id"]), note=note):
            return {"job_id": job_id, "ok": False, "requeued": note}
    reason = f"{stop.reason}; resume the batch to convert it again"
    if rt.jobs.fail(job_id, reason) and "plan" in ctx:
        vm_finished(ctx)
    return {"job_id": job_id, "ok": False, "error": reason}


def _end_interrupted(ctx: dict[str, Any], reason: str) -> None:
    """End a VM whose step cannot run again: release what it holds here, fail it."""
    from vmcraft_tasks.tasks.vm import _release, vm_finished
    from worker.runtime import runtime

    rt = runtime()
    _release(ctx)
    rt.jobs.fail(str(ctx["job_id"]), reason)
    if "plan" in ctx:
        vm_finished(ctx)


def _context(args: tuple[Any, ...]) -> dict[str, Any]:
    """Steps take the VM's job context (a dict with `job_id`) among their arguments;
    the last such dict is the context (a report before it may also name the job)."""
    found: dict[str, Any] = {}
    for arg in args:
        if isinstance(arg, dict) and isinstance(arg.get("job_id"), str):
            found = arg
    return found


def _job_id(args: tuple[Any, ...]) -> str | None:
    job_id = _context(args).get("job_id")
    return str(job_id) if job_id else None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
