"""What every VM step shares: timing, one log line per outcome, progress in Flower."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry

log = logging.getLogger("vmcraft_tasks.tasks")


class VMStep(Task):  # type: ignore[misc]
    """Base for VM steps. Retry policy lives here, not in each task."""

    abstract = True
    # Step failures are facts about one VM, reported in its job record; a retry
    # would only repeat them. Host-full retries are explicit in `attach`.
    max_retries = 0

    # Steps that must run even for a cancelled VM: they are how it ends cleanly.
    runs_when_cancelled = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        outcome = "failed"
        if not self.runs_when_cancelled and self._cancelled(args):
            outcome = "cancelled"
            self._record(args, outcome)
            from vmcraft_tasks.tasks.vm import release_cancelled

            release_cancelled(_context(args))
            raise Ignore()
        try:
            result = super().__call__(*args, **kwargs)
            outcome = "done"
            return result
        except Retry:
            outcome = "retry"  # e.g. the host was full: the VM went back to the intake queue
            raise
        except Ignore:
            outcome = "replaced"  # the step handed the VM on to its next steps
            raise
        except Exception as exc:
            log.warning("%s failed after %.1f ms: %s", self.name, _ms(started), exc)
            raise
        finally:
            log.info("%s %s in %.1f ms", self.name, outcome, _ms(started))
            self._record(args, outcome)

    def _cancelled(self, args: tuple[Any, ...]) -> bool:
        job_id = _job_id(args)
        if not job_id or self.request.called_directly:
            return False
        from vmcraft_tasks.jobs import CANCELLED
        from worker.runtime import runtime

        return runtime().jobs.status(job_id) == CANCELLED

    def _record(self, args: tuple[Any, ...], outcome: str) -> None:
        job_id = _job_id(args)
        if job_id and not self.request.called_directly:
            from worker.runtime import runtime

            rt = runtime()
            rt.jobs.record_step(job_id, self.name, rt.host_id, self.request.id or "", outcome)

    def progress(self, **meta: Any) -> None:
        """A custom state Flower shows while the step runs."""
        if self.request.id and not self.request.called_directly:
            self.update_state(state="PROGRESS", meta=meta)


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
