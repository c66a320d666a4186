"""The conversion host as one worker process sees it: identity, Redis, limits, leases.

Built lazily once per process (prefork children build their own after the fork),
from the same `FleetSettings` every client uses.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from vmcraft_tasks import keys
from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.jobs import JobStore
from vmcraft_tasks.rediscache import RedisScanCache
from worker.broker import Broker
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore
from worker.steps import StepLedger

# The worker's main process exports its pid so pool children can record which
# worker owns an attach; the reconciler of a restarted worker trusts it.
WORKER_PID_ENV = "VMCRAFT_WORKER_PID"

# Steps ride out a short broker outage (a restart, a failover) instead of failing the
# VM: every command is retried with backoff for about half a minute
# (0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 x 14 s), each attempt bounded by socket timeouts
# so a half-open connection cannot hang a step.
STEP_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=19)
# The heartbeat, the reconciler and the conversion watchers must notice an outage,
# not sit it out: a couple of quick retries, then the error.
PROBE_RETRY = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0


def redis_client(url: str, *, patient: bool) -> redis.Redis:
    """A Redis client with the fleet's timeouts and retry policy; it reads text (every
    key and value of the fleet's own is text; `worker.broker` reads kombu's values as
    bytes per command)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S if patient else 10.0,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=30,
        retry=STEP_RETRY if patient else PROBE_RETRY,
    )


@dataclass
class HostRuntime:
    settings: FleetSettings

    @property
    def host_id(self) -> str:
        return self.settings.host_id

    @property
    def host_work_dir(self) -> str:
        """Per-host: several simulated hosts may share one machine."""
        return os.path.join(self.settings.work_dir, self.host_id)

    @property
    def worker_pid(self) -> int:
        return int(os.environ.get(WORKER_PID_ENV) or os.getpid())

    @property
    def holder_ttl_s(self) -> float:
        """Lifetime of a semaphore place unless its holder's host renews it: the
        lease TTL (several heartbeats), never hours."""
        return float(self.settings.lease_ttl_s)

    @cached_property
    def state(self) -> redis.Redis:
        """Coordination state (jobs, leases, limits, registry): the broker's Redis,
        which must not evict keys. Patient: steps ride out short outages."""
        return redis_client(self.settings.broker_url, patient=True)

    @cached_property
    def probe(self) -> redis.Redis:
        """The same Redis for the heartbeat thread and watchers: fails fast."""
        return redis_client(self.settings.broker_url, patient=False)

    @cached_property
    def cache(self) -> RedisScanCache:
        # A cache that is down still fails the scan loudly (never a silent miss), but
        # only after riding out a restart the way the other steps do.
        return RedisScanCache.from_url(
            self.settings.cache_url,
            retry=STEP_RETRY,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
        )

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.state)

    @cached_property
    def probe_jobs(self) -> JobStore:
        return JobStore(self.probe)

    @cached_property
    def leases(self) -> SlotLeases:
        return self._leases(self.state)

    @cached_property
    def probe_leases(self) -> SlotLeases:
        return self._leases(self.probe)

    def _leases(self, client: redis.Redis) -> SlotLeases:
        return SlotLeases(
            client,
            self.host_id,
            self.settings.max_attached,
            self.settings.lease_ttl_s,
            work_dir=self.host_work_dir,
        )

    @cached_property
    def mount_slots(self) -> RedisSemaphore:
        return self.semaphore("mounts", self.settings.max_mounts)

    @cached_property
    def conversion_slots(self) -> RedisSemaphore:
        return self.semaphore("conversions", self.settings.max_conversions)

    @cached_property
    def boot_slots(self) -> RedisSemaphore:
        return self.semaphore("boot_checks", self.settings.max_boot_checks)

    def semaphore(self, name: str, limit: int, *, probe: bool = False) -> RedisSemaphore:
        return RedisSemaphore(
            self.probe if probe else self.state,
            keys.semaphore_key(self.host_id, name),
            limit,
            self.holder_ttl_s,
        )

    def semaphores(self, *, probe: bool = True) -> dict[str, RedisSemaphore]:
        """Every per-host limit, by name (for the reconciler)."""
        return {
            "mounts": self.semaphore("mounts", self.settings.max_mounts, probe=probe),
            "conversions": self.semaphore(
                "conversions", self.settings.max_conversions, probe=probe
            ),
            "boot_checks": self.semaphore(
                "boot_checks", self.settings.max_boot_checks, probe=probe
            ),
        }

    @cached_property
    def ledger(self) -> StepLedger:
        return StepLedger(self.host_work_dir)

    @cached_property
    def broker(self) -> Broker:
        return Broker(self.probe)

    @cached_property
    def craft_settings(self) -> CraftSettings:
        return CraftSettings(work_dir=self.host_work_dir)


_lock = threading.Lock()
_runtime: HostRuntime | None = None
_runtime_pid: int | None = None


def runtime() -> HostRuntime:
    """This process's host runtime; rebuilt after a fork so no connection is shared."""
    global _runtime, _runtime_pid
    with _lock:
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = HostRuntime(FleetSettings.from_env())
            _runtime_pid = os.getpid()
        return _runtime
