"""Batch bookkeeping in Redis: which VMs wait, how many are in flight, who goes next.

A batch drives itself: whenever a VM ends (done, failed, cancelled), the step that
ended it releases its place and dispatches the next waiting VM, highest priority
first, without a scheduler process having to stay up. Accounting is idempotent
(a VM is counted as ended once), so the scheduler's watchdog can repeat it safely
for VMs that ended without a step noticing (a worker killed with -9).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from vmcraft_tasks import keys, luascripts

BATCH_TTL_S = keys.BATCH_TTL_S
UNLIMITED = 0

# Keys `create` replaces; the attempts hash stays (task ids stay unique when a batch
# of the same name is submitted again) and only has its TTL refreshed.
_REPLACED = (
    keys.batch_meta_key,
    keys.batch_pending_key,
    keys.batch_inflight_key,
    keys.batch_ended_key,
    keys.batch_vms_key,
    keys.batch_hosts_key,
)


def job_id_for(batch: str, vm_id: str) -> str:
    return f"{batch}.{vm_id}"


def priority_score(priority: int, index: int) -> float:
    """Higher priority first; within a priority, manifest order (pure)."""
    return priority * 1_000_000 - index


@dataclass(frozen=True)
class BatchCounts:
    total: int
    pending: int
    inflight: int
    ended: int


class BatchStore:
    """A batch's keys (`vmcraft_tasks.keys`, all tagged by the batch name).

    Every write refreshes the TTL of all the batch's keys, so they expire together,
    `BATCH_TTL_S` after the batch was last written. The batches index has no TTL:
    `create` trims the entries older than `BATCH_TTL_S` (their batches are gone).
    Expects a client with `decode_responses=True`.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = luascripts.register(client, "batch_claim")
        self._end = luascripts.register(client, "batch_end")
        self._take_place = luascripts.register(client, "batch_take_host_place")

    @staticmethod
    def _touch(pipe: Any, batch: str) -> None:
        for key in keys.batch_keys(batch):
            pipe.expire(key, BATCH_TTL_S)

    def create(self, batch: str, plan: dict[str, Any], *, max_parallel: int | None) -> None:
        """Record a batch and queue all its VMs as waiting (replaces an older record)."""
        # Per-host place sets of an older batch of this name (read first: their names
        # are only known from the hosts set).
        old_hosts: set[str] = self.client.smembers(keys.batch_hosts_key(batch))  # type: ignore[assignment]
        now = time.time()
        pipe = self.client.pipeline()  # MULTI: one slot, every key tagged by the batch
        for key_of in _REPLACED:
            pipe.delete(key_of(batch))
        for host in sorted(old_hosts):
            pipe.delete(keys.batch_host_key(batch, host))
        meta: dict[Any, Any] = {
            "plan": json.dumps(plan),
            "max_parallel": max_parallel or UNLIMITED,
            "created": now,
        }
        pipe.hset(keys.batch_meta_key(batch), mapping=meta)
        for index, vm in enumerate(plan["vms"]):
            pipe.rpush(keys.batch_vms_key(batch), vm["id"])
            pipe.zadd(
                keys.batch_pending_key(batch), {vm["id"]: priority_score(vm["priority"], index)}
            )
        self._touch(pipe, batch)
        pipe.execute()
        # The fleet-wide index is in another slot: not part of the MULTI. Entries of
        # batches older than their TTL go at the same time.
        listed = self.client.pipeline(transaction=False)
        listed.zadd(keys.batches_index(), {batch: now})
        listed.zremrangebyscore(keys.batches_index(), "-inf", f"({now - BATCH_TTL_S}")
        listed.execute()

    def requeue(self, batch: str, vm_ids: list[str]) -> None:
        """Put VMs back in line (resume): they wait again and count as not ended."""
        plan = self.plan(batch)
        order = {vm["id"]: (vm["priority"], i) for i, vm in enumerate(plan["vms"])}
        pipe = self.client.pipeline()
        for vm_id in vm_ids:
            priority, index = order[vm_id]
            pipe.zadd(keys.batch_pending_key(batch), {vm_id: priority_score(priority, index)})
            pipe.srem(keys.batch_ended_key(batch), vm_id)
        self._touch(pipe, batch)
        pipe.execute()

    def exists(self, batch: str) -> bool:
        return bool(self.client.exists(keys.batch_meta_key(batch)))

    def plan(self, batch: str) -> dict[str, Any]:
        raw = self.client.hget(keys.batch_meta_key(batch), "plan")
        if raw is None:
            raise KeyError(f"no batch {batch!r}")
        data: dict[str, Any] = json.loads(raw)
        return data

    def meta(self, batch: str) -> dict[str, str]:
        raw: dict[str, str] = self.client.hgetall(keys.batch_meta_key(batch))  # type: ignore[assignment]
        return dict(raw)

    def set_meta(self, batch: str, **values: Any) -> None:
        mapping: dict[Any, Any] = {k: str(v) for k, v in values.items()}
        pipe = self.client.pipeline()
        pipe.hset(keys.batch_meta_key(batch), mapping=mapping)
        self._touch(pipe, batch)
        pipe.execute()

    def vm_ids(self, batch: str) -> list[str]:
        return list(self.client.lrange(keys.batch_vms_key(batch), 0, -1))  # type: ignore[arg-type]

    def claim_next(self, batch: str) -> str | None:
        """The next VM to start, if the batch limit allows one more in flight."""
        got = self._claim(keys=self._claim_keys(batch), args=[BATCH_TTL_S])
        return str(got) if got else None

    @staticmethod
    def _claim_keys(batch: str) -> list[str]:
        first = [
            keys.batch_pending_key(batch),
            keys.batch_inflight_key(batch),
            keys.batch_meta_key(batch),
        ]
        return first + [k for k in keys.batch_keys(batch) if k not in first]

    @staticmethod
    def _end_keys(batch: str) -> list[str]:
        first = [keys.batch_ended_key(batch), keys.batch_inflight_key(batch)]
        return first + [k for k in keys.batch_keys(batch) if k not in first]

    def drop_vm(self, batch: str, vm_id: str) -> None:
        """Take one VM out of line for good: it will not start, it counts as ended."""
        pipe = self.client.pipeline()
        pipe.zrem(keys.batch_pending_key(batch), vm_id)
        pipe.sadd(keys.batch_ended_key(batch), vm_id)
        self._touch(pipe, batch)
        pipe.execute()

    def drop_pending(self, batch: str) -> list[str]:
        """Take every waiting VM out of line (cancel); returns their ids."""
        key = keys.batch_pending_key(batch)
        pipe = self.client.pipeline()
        pipe.zrange(key, 0, -1)
        pipe.delete(key)
        ids, _ = pipe.execute()
        return [str(v) for v in ids]

    def mark_ended(self, batch: str, vm_id: str) -> bool:
        """Release the VM's place in the batch; True only the first time."""
        return bool(self._end(keys=self._end_keys(batch), args=[vm_id, BATCH_TTL_S]))

    def next_attempt(self, batch: str, vm_id: str) -> int:
        """Count one more start message of `vm_id`; returns its number (1, 2, ...)."""
        pipe = self.client.pipeline()
        pipe.hincrby(keys.batch_attempts_key(batch), vm_id, 1)
        self._touch(pipe, batch)
        return int(pipe.execute()[0])

    def attempts(self, batch: str, vm_id: str) -> int | None:
        """How many start messages `vm_id` was sent (None: never, or forgotten)."""
        raw = self.client.hget(keys.batch_attempts_key(batch), vm_id)
        return int(raw) if raw is not None else None

    def take_host_place(self, batch: str, host: str, vm_id: str, limit: int) -> bool:
        """A place for `vm_id` among the batch's VMs on `host` (`limits.max_per_host`):
        True if it holds one now (it already did, or fewer than `limit` VMs of the batch
        run there; `limit` 0 is unlimited). Atomic: two VMs never take the last place."""
        if limit < 0:
            raise ValueError(f"a per-host limit must be >= 0, not {limit}")
        script_keys = [keys.batch_host_key(batch, host), keys.batch_hosts_key(batch)]
        return bool(self._take_place(keys=script_keys, args=[vm_id, limit, BATCH_TTL_S, host]))

    def release_host_place(self, batch: str, host: str, vm_id: str) -> bool:
        """Give `vm_id`'s place on `host` back; True if it held one."""
        return bool(self.client.srem(keys.batch_host_key(batch, host), vm_id))

    def host_places(self, batch: str, host: str) -> set[str]:
        """The batch's VMs holding a place on `host`."""
        members: set[str] = self.client.smembers(keys.batch_host_key(batch, host))  # type: ignore[assignment]
        return set(members)

    def ended_ids(self, batch: str) -> set[str]:
        members: set[str] = self.client.smembers(keys.batch_ended_key(batch))  # type: ignore[assignment]
        return set(members)

    def pending_ids(self, batch: str) -> set[str]:
        members: list[Any] = list(self.client.zrange(keys.batch_pending_key(batch), 0, -1))
        return {str(v) for v in members}

    def unfinished(self) -> list[str]:
        """Batches that exist and have VMs that did not end (one round trip)."""
        names = self.batches()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys.batch_meta_key(name))
            pipe.llen(keys.batch_vms_key(name))
            pipe.scard(keys.batch_ended_key(name))
        replies: list[Any] = pipe.execute()
        found = []
        for i, name in enumerate(names):
            exists, total, ended = replies[3 * i : 3 * i + 3]
            if exists and int(ended) < int(total):
                found.append(name)
        return found

    def counts(self, batch: str) -> BatchCounts:
        pipe = self.client.pipeline()
        pipe.llen(keys.batch_vms_key(batch))
        pipe.zcard(keys.batch_pending_key(batch))
        pipe.get(keys.batch_inflight_key(batch))
        pipe.scard(keys.batch_ended_key(batch))
        total, pending, inflight, ended = pipe.execute()
        return BatchCounts(int(total), int(pending), int(inflight or 0), int(ended))

    def batches(self) -> list[str]:
        names: list[Any] = list(self.client.zrange(keys.batches_index(), 0, -1))
        return [str(b) for b in names]


def dispatch(store: BatchStore, batch: str, send: Callable[[str], object]) -> list[str]:
    """Start waiting VMs while the batch has room; returns the ids started."""
    started: list[str] = []
    while True:
        vm_id = store.claim_next(batch)
        if vm_id is None:
            return started
        send(vm_id)
        started.append(vm_id)
