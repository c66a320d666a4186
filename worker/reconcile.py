"""The host's reconciler: every lease, place, disk and message of this host stays tied
to something alive, and what is not is freed or handed on within a bounded time.

It runs in the worker's main process: once at start (before the worker consumes),
on every heartbeat, and once at a warm shutdown (after the running steps ended).
Each run looks at this host's own facts first, which survive a Redis restart and a
worker killed with -9:

- the step ledger (`worker.steps`): a step whose process is gone died mid-step;
- conversion records (`worker.conversions`): a dead holder's qemu-img is killed
  (verified by command line) and its `.part` files removed;
- boot-check records (`worker.bootchecks`): a dead holder's qemu is killed by its
  recorded pid (verified by start time and command line);
- attach state directories and their job markers, and the lease mirror.

Then, from Redis: the host's semaphore places (live holders renewed, dead ones
evicted at once), its slot leases, the state of every VM it holds something for, and
the broker's queued and unacknowledged messages. For each such VM:

| the VM's record is ... | and here ... | the reconciler |
|---|---|---|
| gone (Redis came back empty) | no live step | releases its disk and lease, logs it |
| ended, queued, or on another host | no live step | releases the leftovers |
| in flight here | its attach was made by a worker that died | releases it, fails the VM |
| in flight here | a live step, or a message queued/unacked | renews its lease (re-takes it) |
| in flight here | nothing, for a grace period | releases it, fails the VM ("lost") |

An unacknowledged message of this host's queue (or of the intake queue) that no live
worker holds is redelivered at once: restored to its queue, or dropped when its VM
ended or the step already ran to its end here. kombu would only do this after the
visibility timeout (hours).

At a warm shutdown every VM still in flight here ends: with a disk attached it is
failed with the reason, without one (it was waiting to convert) it is handed back to
the queue for another host.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, current_app

from vmcraft_tasks import jobs, keys
from vmcraft_tasks.batches import BatchStore
from vmcraft_tasks.craft.nbd.helpers import process_alive
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from vmcraft_tasks.craft.vmstate import release_vm
from vmcraft_tasks.jobmarker import read_job_marker
from vmcraft_tasks.migration import batch_vm_of, requeue_vm
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue
from worker import bootchecks, conversions
from worker.broker import Message
from worker.ending import end_vm
from worker.registry import list_hosts, server_time
from worker.runtime import HostRuntime
from worker.steps import COMPLETED, StepRecord

log = logging.getLogger(__name__)

START = "start"
BEAT = "beat"
STOP = "stop"

ATTACH_TASK = "vmcraft.vm.attach"
# An attach directory without a job marker may be one being made right now; during
# normal running it is only released once no attach step runs and it is this old.
UNMARKED_ATTACH_GRACE_S = 120.0
PRUNE_EVERY_S = 600.0


@dataclass
class ReconcileReport:
    released_attaches: list[str] = field(default_factory=list)
    released_leases: list[str] = field(default_factory=list)
    failed_jobs: list[str] = field(default_factory=list)
    requeued_jobs: list[str] = field(default_factory=list)
    gone_jobs: list[str] = field(default_factory=list)
    dead_steps: list[str] = field(default_factory=list)
    evicted_places: list[str] = field(default_factory=list)
    cleaned_conversions: list[str] = field(default_factory=list)
    cleaned_boot_checks: list[str] = field(default_factory=list)
    restored_messages: list[str] = field(default_factory=list)
    dropped_messages: list[str] = field(default_factory=list)
    redis_error: str | None = None

    def changed(self) -> bool:
        return any(
            getattr(self, name) for name in self.__dataclass_fields__ if name != "redis_error"
        )

    def summary(self) -> str:
        parts = [
            f"{name.replace('_', ' ')}: {', '.join(value)}"
            for name, value in vars(self).items()
            if isinstance(value, list) and value
        ]
        return "; ".join(parts) or "nothing to do"


def owner_alive(worker_pid: object, me: int) -> bool:
    return isinstance(worker_pid, int) and worker_pid != me and process_alive(worker_pid)


# A request the worker's main process holds in memory (reserved, scheduled, running):
# (task id, task name, retries, job id or None).
HeldTask = tuple[str, str, int, str | None]
HeldTasks = Callable[[], list[HeldTask]]


def _no_tasks() -> list[HeldTask]:
    return []


class Reconciler:
    """One per worker main process; `run()` is thread-safe (one run at a time)."""

    def __init__(
        self, rt: HostRuntime, *, held: HeldTasks = _no_tasks, app: Celery | None = None
    ) -> None:
        self.rt = rt
        self.held = held
        # The fleet's app (the worker injects it): ending or requeueing a batch VM sends
        # the batch's next start message.
        self.app: Celery = app if app is not None else current_app
        self._lock = threading.Lock()
        # First time (monotonic) each suspicion was seen: acting on one needs it to
        # hold for a grace period, over more than one run.
        self._lost_since: dict[str, float] = {}
        self._orphan_since: dict[str, float] = {}
        self._missing_since: dict[str, float] = {}
        self._held_since: dict[tuple[str, str, int], float] = {}
        self._healthy_since: float | None = None
        self._last_prune = 0.0

    @property
    def grace_s(self) -> float:
        """How long a suspicion must hold before the reconciler acts on it: a few
        heartbeats, and at least a lease lifetime (every live host has republished
        what it holds by then)."""
        settings = self.rt.settings
        return float(max(3 * settings.heartbeat_s, settings.lease_ttl_s))

    def run(self, phase: str, *, reason: str | None = None) -> ReconcileReport:
        report = ReconcileReport()
        with self._lock:
            try:
                self._run(phase, report, reason)
            except redis.RedisError as exc:
                self._healthy_since = None
                report.redis_error = str(exc)
                log.warning(
                    "reconcile of host %s (%s) cut short: Redis unreachable: %s",
                    self.rt.host_id,
                    phase,
                    exc,
                )
        if report.changed():
            log.warning("reconciled host %s (%s): %s", self.rt.host_id, phase, report.summary())
        return report

    # -- one run -----------------------------------------------------------------

    def _run(self, phase: str, report: ReconcileReport, reason: str | None) -> None:
        rt = self.rt
        me = rt.host_id
        os.makedirs(rt.host_work_dir, mode=0o700, exist_ok=True)
        live, _dead = self._steps(report)
        live_keys = {r.holder.key for r in live}
        self._conversions(live_keys, report)
        self._boot_checks(live_keys, report)
        # From here on Redis is needed; a failure ends the run (next beat retries).
        rt.probe.ping()
        mono = time.monotonic()
        if self._healthy_since is None:
            self._healthy_since = mono
        self._places(live_keys, report)
        held = self._believable(self.held() if phase != STOP else [], live, mono)
        held_jobs = {j for j in held.values() if j}
        live_jobs = {r.job_id for r in live if r.job_id} | held_jobs
        live_attaching = any(r.task == ATTACH_TASK for r in live)

        leases = rt.probe_leases
        redis_leases = set(leases.held().values())
        mirrored = set(leases.local_owners())
        attaches = {d: read_job_marker(d) for d in attach_state_dirs(rt.host_work_dir)}
        by_job: dict[str, list[str]] = {}
        for state_dir, marker in attaches.items():
            job = str(marker.get("job_id") or "")
            if job:
                by_job.setdefault(job, []).append(state_dir)
            elif self._unmarked_releasable(phase, state_dir, live_attaching):
                self._release_dir(state_dir, report, "attach without an owner")
        inventory = sorted(redis_leases | mirrored | set(by_job) | live_jobs)
        statuses = rt.probe_jobs.statuses(inventory) if inventory else {}
        unacked = rt.broker.unacked() if phase != STOP else []
        queued, complete = (
            rt.broker.queued([host_queue(me), INTAKE_QUEUE]) if phase != STOP else ([], True)
        )
        waiting = {m.job_id for m in [*queued, *unacked] if m.job_id}
        kept: set[str] = set()
        for job in inventory:
            status, host = statuses.get(job, (None, None))
            verdict = self._judge(
                phase,
                job,
                status,
                host,
                alive=job in live_jobs,
                waiting=job in waiting or not complete,
                dirs=by_job.get(job, []),
                mono=mono,
                reason=reason,
                report=report,
            )
            if verdict:
                kept.add(job)
        self._keep(kept, redis_leases, mirrored)
        self._stamp_alive(kept & live_jobs)
        for gone in set(self._lost_since) - set(inventory):
            self._lost_since.pop(gone, None)
        if phase != STOP:
            self._orphans(
                phase,
                unacked=unacked,
                held=held,
                live=live,
                statuses=statuses,
                mono=mono,
                report=report,
            )
            self._publish_held(held, live)
            self._prune()

    def _believable(
        self, held: list[HeldTask], live: list[StepRecord], mono: float
    ) -> dict[str, str | None]:
        """Task id -> job id of the requests in memory that are evidence of life.

        Celery's in-memory request sets can keep a request after a broker connection
        reset (seen here: a request of a step that had ended stayed "active" until the
        worker stopped). So a request counts only while the step ledger agrees: it is
        running, or it has not started yet and was first seen less than a grace
        period ago (a prefetched or ETA message waits seconds, not minutes: the
        prefetch window is the pool size). One the ledger says ended is stale.
        """
        running = {(r.task, r.task_id, r.retries) for r in live}
        found: dict[str, str | None] = {}
        seen = set()
        for task_id, task, retries, job in held:
            key = (task, task_id, retries)
            seen.add(key)
            if key in running:
                found[task_id] = job
            elif self.rt.ledger.completed(task, task_id, retries) is None:
                first = self._held_since.setdefault(key, mono)
                if mono - first < self.grace_s:
                    found[task_id] = job
        for key in set(self._held_since) - seen:
            self._held_since.pop(key, None)
        return found

    def _steps(self, report: ReconcileReport) -> tuple[list[StepRecord], list[StepRecord]]:
        live, dead = [], []
        for record in self.rt.ledger.running():
            if record.holder.process_alive():
                live.append(record)
                if time.time() > record.deadline:
                    log.warning(
                        "step %s %s of VM %s is past its deadline (pid %d still runs)",
                        record.task,
                        record.task_id,
                        record.job_id,
                        record.pid,
                    )
            else:
                dead.append(record)
                self.rt.ledger.mark_died(record)
                report.dead_steps.append(f"{record.task} {record.task_id} (VM {record.job_id})")
        return live, dead

    def _conversions(self, live_keys: set[tuple[str, str, int]], report: ReconcileReport) -> None:
        found = conversions.records(self.rt.host_work_dir)
        live: list[tuple[str, conversions.ConversionRecord]] = []
        dead: list[tuple[str, conversions.ConversionRecord]] = []
        for path, record in found:
            holder = record.holder_obj
            (live if holder is not None and holder.key in live_keys else dead).append(
                (path, record)
            )
        protected = [part for _path, record in live for part in record.parts]
        for path, record in dead:
            done = conversions.cleanup(path, record, protected=protected)
            report.cleaned_conversions.append(
                f"{record.target} (VM {record.job_id}): {', '.join(done) or 'nothing left'}"
            )

    def _boot_checks(self, live_keys: set[tuple[str, str, int]], report: ReconcileReport) -> None:
        """A boot check whose holder died leaves qemu running: kill it by its record."""
        for path, record in bootchecks.records(self.rt.host_work_dir):
            holder = record.holder_obj
            if holder is not None and holder.key in live_keys:
                continue
            done = bootchecks.cleanup(path, record)
            report.cleaned_boot_checks.append(f"VM {record.job_id}: {done}")

    def _places(self, live_keys: set[tuple[str, str, int]], report: ReconcileReport) -> None:
        """Renew the semaphore places of live holders of this host; evict dead ones."""
        for name, sem in self.rt.semaphores(probe=True).items():
            for token, holder in sem.holders_detail().items():
                if holder is None or holder.host != self.rt.host_id:
                    continue  # taken without a holder (a test, an operator): its TTL rules
                if holder.key in live_keys:
                    sem.refresh(token)
                elif sem.evict(token, holder):
                    report.evicted_places.append(f"{name} {token} (pid {holder.pid})")

    def _unmarked_releasable(self, phase: str, state_dir: str, live_attaching: bool) -> bool:
        if phase != BEAT:
            return True
        if live_attaching:
            return False
        try:
            age = time.time() - os.stat(state_dir).st_mtime
        except FileNotFoundError:
            return False
        return age > UNMARKED_ATTACH_GRACE_S

    def _judge(
        self,
        phase: str,
        job: str,
        status: str | None,
        host: str | None,
        *,
        alive: bool,
        waiting: bool,
        dirs: list[str],
        mono: float,
        reason: str | None,
        report: ReconcileReport,
    ) -> bool:
        """Decide one VM this host holds something for; True: keep its lease."""
        rt = self.rt
        me = rt.host_id
        if status is None:
            if alive:
                return True  # let the step end; the next one is skipped (record gone)
            if phase == BEAT and not self._held_for(self._missing_since, job, mono):
                return True
            self._missing_since.pop(job, None)
            log.warning(
                "host %s: the record of VM %s is gone from Redis (it restarted without "
                "its data?): releasing what the VM held here",
                me,
                job,
            )
            self._release_job(job, dirs, report)
            report.gone_jobs.append(job)
            return False
        self._missing_since.pop(job, None)
        if status in jobs.TERMINAL or status == jobs.QUEUED or (host and host != me):
            if not alive:
                # Leftovers: the VM ended, or was handed back to the queue or to
                # another host, while something of it stayed here.
                self._release_job(job, dirs, report)
            return alive
        dead_owner = [d for d in dirs if _dead_owner(read_job_marker(d), rt.worker_pid)]
        if dead_owner:
            why = (
                f"worker of host {me} died while the VM was in flight; its disk was "
                "released when the host's worker restarted"
            )
            self._end_job(job, dirs, why, report)
            return False
        if phase == STOP:
            why = reason or f"host {me} shut down while the VM was in flight"
            if dirs:
                self._end_job(job, dirs, f"{why}; its disk was released", report)
            else:
                self._requeue_or_end(job, f"{why}; it holds no disk yet", report)
            return False
        if alive or waiting:
            self._lost_since.pop(job, None)
            return True
        if phase == BEAT and not self._held_for(self._lost_since, job, mono):
            return True
        self._lost_since.pop(job, None)
        last = self._last_step(job)
        why = (
            f"no step of the VM is running or queued on host {me} any more (its last "
            f"step was {last}; its message was lost, e.g. when the broker restarted)"
        )
        self._end_job(job, dirs, f"{why}; its disk was released" if dirs else why, report)
        return False

    def _held_for(self, since: dict[str, float], key: str, mono: float) -> bool:
        """Has this suspicion held for a grace period (first seen at an earlier run)?"""
        first = since.setdefault(key, mono)
        return mono - first >= self.grace_s

    def _keep(self, kept: set[str], redis_leases: set[str], mirrored: set[str]) -> None:
        leases = self.rt.probe_leases
        for job in sorted((kept & mirrored) - redis_leases):
            # Redis lost the lease (a restart, or it lapsed while Redis was down) while
            # the VM is alive here: take it back, so the slot is not given away.
            if leases.acquire(job) is None:
                log.warning(
                    "host %s: could not take back the slot of VM %s (all taken)",
                    self.rt.host_id,
                    job,
                )
        leases.refresh_all(kept)

    def _stamp_alive(self, jobs_alive: set[str]) -> None:
        """`progress.alive_at`: when this host last saw a live step of the VM. A long
        conversion records no step for hours; a stall watchdog must read this instead
        of calling it stalled."""
        now = time.time()
        for job in sorted(jobs_alive):
            self.rt.probe_jobs.set_progress(job, alive_at=round(now, 3))

    # -- ending and releasing ------------------------------------------------------

    def _release_dir(self, state_dir: str, report: ReconcileReport, why: str) -> None:
        try:
            release_vm(state_dir)
        except Exception as exc:  # one stuck attach must not stop the rest
            log.warning("could not release %s (%s): %s", state_dir, why, exc)
            return
        log.warning("released %s (%s)", state_dir, why)
        report.released_attaches.append(state_dir)

    def _release_job(self, job: str, dirs: Iterable[str], report: ReconcileReport) -> None:
        for state_dir in dirs:
            self._release_dir(state_dir, report, f"VM {job}")
        leases = self.rt.probe_leases
        released = leases.release(job)
        if released:
            report.released_leases.append(job)

    def _end_job(self, job: str, dirs: list[str], why: str, report: ReconcileReport) -> None:
        self._release_job(job, dirs, report)
        if self._end(job, why):
            report.failed_jobs.append(job)
            log.warning("VM %s failed: %s", job, why)

    def _requeue_or_end(self, job: str, why: str, report: ReconcileReport) -> None:
        self._release_job(job, [], report)
        batch_vm = batch_vm_of(self.rt.probe, job)
        if batch_vm is not None:
            store = BatchStore(self.rt.probe)
            if requeue_vm(self.app, store, self.rt.probe_jobs, *batch_vm, note=why):
                report.requeued_jobs.append(job)
                return
        if self._end(job, why):
            report.failed_jobs.append(job)

    def _end(self, job: str, why: str) -> bool:
        """End a VM whose worker is gone (its attach and slot were released above):
        failed, reported, and its batch moves on."""
        try:
            return end_vm(self.app, self.rt.probe, job, "failed", reason=why)
        except redis.RedisError:
            raise
        except Exception as exc:
            log.warning("could not end VM %s in its batch: %s", job, exc)
            return False

    def _last_step(self, job: str) -> str:
        raw = self.rt.probe.lindex(keys.job_steps_key(job), -1)
        if raw is None:
            return "none recorded"
        try:
            entry = json.loads(raw)
            return f"{entry['task']} ({entry['outcome']} on {entry['host']})"
        except (ValueError, KeyError, TypeError):
            return "unreadable"

    # -- messages --------------------------------------------------------------------

    def _orphans(
        self,
        phase: str,
        *,
        unacked: list[Message],
        held: dict[str, str | None],
        live: list[StepRecord],
        statuses: dict[str, tuple[str | None, str | None]],
        mono: float,
        report: ReconcileReport,
    ) -> None:
        """Redeliver unacknowledged messages no live worker holds (see the module doc)."""
        me = self.rt.host_id
        running_ids = {r.task_id for r in live}
        now = server_time(self.rt.probe)
        seen = set()
        for message in unacked:
            tag = message.tag or ""
            ours = message.host == me
            if not (ours or message.queue == INTAKE_QUEUE) or not message.job_id:
                continue
            if message.task_id in held or message.task_id in running_ids:
                continue
            if phase == BEAT:
                seen.add(tag)
                delivered = message.delivered_at or now
                if now - delivered < self.grace_s:
                    continue
                if not ours and not self._settled(mono):
                    continue
                if not self._held_for(self._orphan_since, tag, mono):
                    continue
            if not ours and self._held_elsewhere(message):
                continue
            self._orphan_since.pop(tag, None)
            self._redeliver(message, statuses, report)
        for tag in set(self._orphan_since) - seen:
            self._orphan_since.pop(tag, None)

    def _settled(self, mono: float) -> bool:
        """Connected long enough for every live host to have republished what it holds."""
        return (
            self._healthy_since is not None
            and mono - self._healthy_since >= self.rt.settings.lease_ttl_s
        )

    def _held_elsewhere(self, message: Message) -> bool:
        """Could another host hold this intake message? True unless every other host
        that might has said, since the message was delivered, that it does not."""
        delivered = message.delivered_at or 0.0
        for status in list_hosts(self.rt.probe):
            if status.host_id == self.rt.host_id:
                continue
            raw = self.rt.probe.get(keys.host_tasks_key(status.host_id))
            if raw is None:
                if status.online:
                    return True  # online but has not said what it holds yet
                continue  # offline for a lease lifetime: it holds nothing
            try:
                data = json.loads(raw)
                if float(data["as_of"]) < delivered + 1.0:
                    return True  # it last spoke before it could have taken the message
                if message.task_id in data["tasks"]:
                    return True
            except (ValueError, KeyError, TypeError):
                return True
        return False

    def _redeliver(
        self,
        message: Message,
        statuses: dict[str, tuple[str | None, str | None]],
        report: ReconcileReport,
    ) -> None:
        rt = self.rt
        job = message.job_id or ""
        status = statuses.get(job, (None, None))[0] if job in statuses else None
        if job not in statuses:
            status = rt.probe_jobs.status(job)
        label = f"{message.task} {message.task_id} (VM {job})"
        stale = None
        if status is None:
            stale = "its VM's record is gone"
        elif status in jobs.TERMINAL:
            stale = f"its VM already ended ({status})"
        elif rt.ledger.completed(message.task, message.task_id, message.retries) is not None:
            stale = "the step already ran to its end here (its acknowledgement was lost)"
        elif self._completed_elsewhere(job, message):
            stale = "the step already ran to its end (its acknowledgement was lost)"
        if stale is not None:
            if rt.broker.drop(message):
                report.dropped_messages.append(f"{label}: {stale}")
            return
        if rt.broker.restore(message):
            report.restored_messages.append(f"{label}: no live worker held it")

    def _completed_elsewhere(self, job: str, message: Message) -> bool:
        raw: list[Any] = self.rt.probe.lrange(keys.job_steps_key(job), 0, -1)
        for item in raw:
            try:
                entry = json.loads(item)
            except ValueError:
                continue
            if (
                entry.get("task") == message.task
                and entry.get("task_id") == message.task_id
                and int(entry.get("retries") or 0) == message.retries
                and entry.get("outcome") in COMPLETED
            ):
                return True
        return False

    def _publish_held(self, held: dict[str, str | None], live: list[StepRecord]) -> None:
        """Say which task ids this host holds, for other hosts' reconcilers."""
        tasks = sorted(set(held) | {r.task_id for r in live})
        payload = json.dumps({"as_of": server_time(self.rt.probe), "tasks": tasks})
        ttl_ms = int(self.rt.settings.lease_ttl_s * 1000)
        self.rt.probe.set(keys.host_tasks_key(self.rt.host_id), payload, px=ttl_ms)

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        # A message's acknowledgement may be lost as long as kombu would still
        # redeliver it: keep finished steps that long.
        keep_s = self.rt.settings.visibility_timeout_s + 3600
        self.rt.ledger.prune(keep_s)


def _dead_owner(marker: dict[str, object], me: int) -> bool:
    pid = marker.get("worker_pid")
    return isinstance(pid, int) and pid != me and not process_alive(pid)


def reconcile(rt: HostRuntime, *, reason: str, phase: str = START) -> ReconcileReport:
    """One run of a fresh reconciler (worker start; tests)."""
    return Reconciler(rt).run(phase, reason=reason)
