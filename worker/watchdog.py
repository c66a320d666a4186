"""The batch watchdog, run by the workers themselves on a timer.

A batch drives itself as long as each VM's last step accounts for its end. This
watchdog covers the cases where no step can: it runs in one worker of the fleet at a
time (a fleet-wide lock), every few heartbeats, whether or not a client asks for the
batch's status.

For every batch that has not finished, and every VM of it in flight:

- the VM ended but its place in the batch was not released (the reconciler of
  another host, or a client, ended it): its report is written and the batch moves on;
- its host went offline (no heartbeat for three lease lifetimes) while the VM was in
  flight: a VM still waiting to convert holds no disk and is handed back to the queue
  for another host; any other is failed with the reason (its disk stays attached on
  that host until its worker restarts and releases it);
- it is `queued` and claimed but no start message for it exists anywhere (queued,
  unacknowledged, or held by a live worker) for a grace period: the start message is
  sent again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import redis
from celery import Celery

from vmcraft_tasks import jobs, keys
from vmcraft_tasks.batches import BatchStore, job_id_for
from vmcraft_tasks.jobs import JobStore
from vmcraft_tasks.migration import current_start_id, requeue_vm, send_vm
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue
from worker.broker import Broker
from worker.ending import end_vm
from worker.registry import HostStatus, list_hosts, server_time

log = logging.getLogger(__name__)

LOCK = "batch-watchdog"
# A VM that ended this long ago without its batch place released is accounted for.
ACCOUNT_AFTER_S = 5.0
# States in which a VM holds nothing but its place: it may start again elsewhere.
NOTHING_ATTACHED = frozenset({jobs.CONVERTING})


@dataclass
class WatchdogReport:
    accounted: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)

    def changed(self) -> bool:
        return bool(self.accounted or self.requeued or self.failed or self.resent)


class BatchWatchdog:
    """One per worker main process; only the holder of the fleet lock does the work."""

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        *,
        owner: str,
        interval_s: float,
        lease_ttl_s: float,
    ) -> None:
        self.client = client
        self.app = app
        self.owner = owner
        self.interval_s = interval_s
        self.lease_ttl_s = lease_ttl_s
        self.host_grace_s = 3 * lease_ttl_s
        self._last_run = 0.0
        self._healthy_since: float | None = None
        self._unsent_since: dict[str, float] = {}

    def maybe_run(self) -> WatchdogReport | None:
        """Run if it is time and this worker gets the fleet lock; None otherwise."""
        mono = time.monotonic()
        if mono - self._last_run < self.interval_s:
            return None
        self._last_run = mono
        try:
            if self._healthy_since is None:
                self._healthy_since = mono
            lock_ms = max(int(self.interval_s * 1000 * 0.9), 1)
            if not self.client.set(keys.lock_key(LOCK), self.owner, nx=True, px=lock_ms):
                return None
            report = self.run(mono)
        except redis.RedisError as exc:
            self._healthy_since = None
            log.warning("batch watchdog skipped: Redis unreachable: %s", exc)
            return None
        if report.changed():
            log.warning("batch watchdog: %s", report)
        return report

    def run(self, mono: float | None = None) -> WatchdogReport:
        mono = time.monotonic() if mono is None else mono
        report = WatchdogReport()
        store = BatchStore(self.client)
        job_store = JobStore(self.client)
        hosts = {h.host_id: h for h in list_hosts(self.client)}
        now = server_time(self.client)
        # Right after an outage, hosts have not beaten again yet: no host counts as
        # gone before every live one had a lease lifetime to come back.
        settled = self._healthy_since is not None and mono - self._healthy_since >= self.lease_ttl_s
        starts: set[str] | None = None
        for batch in store.unfinished():
            ended, pending = store.ended_ids(batch), store.pending_ids(batch)
            for vm_id in store.vm_ids(batch):
                if vm_id in ended or vm_id in pending:
                    continue
                job_id = job_id_for(batch, vm_id)
                status, host = job_store.status_and_host(job_id)
                if status is None:
                    continue
                if status in jobs.TERMINAL:
                    # The VM's own last step may be accounting for it right now: step
                    # in only once it has been over for a while.
                    if now - _ended_at(self.client, job_id, status) > ACCOUNT_AFTER_S:
                        end_vm(self.app, self.client, job_id, "ended")
                        report.accounted.append(job_id)
                    continue
                if status == jobs.QUEUED:
                    if starts is None:
                        starts = self._start_messages(hosts)
                    self._check_queued(
                        store, batch=batch, vm_id=vm_id, starts=starts, mono=mono, report=report
                    )
                    continue
                self._unsent_since.pop(job_id, None)
                if host and settled and self._gone(hosts.get(host), now):
                    self._host_gone(
                        store,
                        job_store=job_store,
                        batch=batch,
                        vm_id=vm_id,
                        status=status,
                        host=host,
                        report=report,
                    )
        return report

    def _gone(self, status: HostStatus | None, now: float) -> bool:
        if status is None:
            return True  # not even in the index (Redis lost it and it never came back)
        return not status.online and now - status.last_seen > self.host_grace_s

    def _host_gone(
        self,
        store: BatchStore,
        *,
        job_store: JobStore,
        batch: str,
        vm_id: str,
        status: str,
        host: str,
        report: WatchdogReport,
    ) -> None:
        job_id = job_id_for(batch, vm_id)
        silent = f"no heartbeat for over {self.host_grace_s:.0f} s"
        if status in NOTHING_ATTACHED:
            note = f"host {host} went offline while the VM was {status} ({silent})"
            if requeue_vm(self.app, store, job_store, batch, vm_id, note=note):
                report.requeued.append(job_id)
            return
        reason = (
            f"host {host} went offline while the VM was {status} ({silent}); its disk "
            "stays attached there until that host's worker restarts and releases it"
        )
        if end_vm(self.app, self.client, job_id, "failed", reason=reason):
            report.failed.append(job_id)

    def _start_messages(self, hosts: dict[str, HostStatus]) -> set[str]:
        """Task ids of every start message that exists somewhere right now."""
        broker = Broker(self.client)
        queues = [INTAKE_QUEUE, *(host_queue(h) for h in hosts)]
        queued, complete = broker.queued(queues)
        found = {m.task_id for m in queued}
        found |= {m.task_id for m in broker.unacked()}
        for host in hosts:
            raw = self.client.get(keys.host_tasks_key(host))
            if raw is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    found |= set(json.loads(raw)["tasks"])
        if not complete:
            found.add("*")  # a queue too long to read: assume every start is in it
        return found

    def _check_queued(
        self,
        store: BatchStore,
        *,
        batch: str,
        vm_id: str,
        starts: set[str],
        mono: float,
        report: WatchdogReport,
    ) -> None:
        job_id = job_id_for(batch, vm_id)
        current = current_start_id(self.client, batch, vm_id)
        if "*" in starts or (current is not None and current in starts):
            self._unsent_since.pop(job_id, None)
            return
        first = self._unsent_since.setdefault(job_id, mono)
        if mono - first < max(self.host_grace_s / 3, self.interval_s):
            return
        self._unsent_since.pop(job_id, None)
        send_vm(self.app, store, batch, vm_id)
        report.resent.append(job_id)


def _ended_at(client: redis.Redis, job_id: str, status: str) -> float:
    raw = client.hget(keys.job_key(job_id), f"at:{status}")
    try:
        return float(raw) if raw is not None else 0.0
    except ValueError:
        return 0.0
