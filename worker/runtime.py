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

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.jobs import JobStore
from vmcraft_tasks.rediscache import RedisScanCache
from worker import keys
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore

# The worker's main process exports its pid so pool children can record which
# worker owns an attach; the reconciler of a restarted worker trusts it.
WORKER_PID_ENV = "VMCRAFT_WORKER_PID"

MOUNT_HOLD_TTL_S = 300.0
CONVERSION_HOLD_TTL_S = 3 * 3600.0


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

    @cached_property
    def state(self) -> redis.Redis:
        """Coordination state (jobs, leases, limits, registry): the broker's Redis,
        which must not evict keys."""
        return redis.Redis.from_url(self.settings.broker_url)

    @cached_property
    def cache(self) -> RedisScanCache:
        return RedisScanCache.from_url(self.settings.cache_url)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.state)

    @cached_property
    def leases(self) -> SlotLeases:
        return SlotLeases(
            self.state,
            self.host_id,
            self.settings.max_attached,
            self.settings.lease_ttl_s,
            work_dir=self.host_work_dir,
        )

    @cached_property
    def mount_slots(self) -> RedisSemaphore:
        return RedisSemaphore(
            self.state,
            keys.semaphore_key(self.host_id, "mounts"),
            self.settings.max_mounts,
            MOUNT_HOLD_TTL_S,
        )

    @cached_property
    def conversion_slots(self) -> RedisSemaphore:
        return RedisSemaphore(
            self.state,
            keys.semaphore_key(self.host_id, "conversions"),
            self.settings.max_conversions,
            CONVERSION_HOLD_TTL_S,
        )

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
