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

BATCH_PREFIX = "vmcraft:v1:batch:"
BATCHES_INDEX = "vmcraft:v1:batches"
BATCH_TTL_S = 30 * 24 * 3600
UNLIMITED = 0

# KEYS: pending zset, inflight counter, meta hash. ARGV: none.
# Pops the best waiting VM if the batch has room; returns its id or nil.
_CLAIM = """
local limit = tonumber(redis.call('HGET', KEYS[3], 'max_parallel') or '0')
local inflight = tonumber(redis.call('GET', KEYS[2]) or '0')
if limit > 0 and inflight >= limit then
  return false
end
local popped = redis.call('ZPOPMAX', KEYS[1])
if #popped == 0 then
  return false
end
redis.call('INCR', KEYS[2])
return popped[1]
"""

# KEYS: ended set, inflight counter. ARGV: vm id. Returns 1 the first time only.
_END = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  local left = redis.call('DECR', KEYS[2])
  if left < 0 then redis.call('SET', KEYS[2], 0) end
  return 1
end
return 0
"""


def job_id_for(batch: str, vm_id: str) -> str:
    return f"{batch}.{vm_id}"


def _k(batch: str, part: str) -> str:
    return f"{BATCH_PREFIX}{batch}:{part}"


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
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = client.register_script(_CLAIM)
        self._end = client.register_script(_END)

    def create(self, batch: str, plan: dict[str, Any], *, max_parallel: int | None) -> None:
        """Record a batch and queue all its VMs as waiting (replaces an older record)."""
        pipe = self.client.pipeline()
        for part in ("meta", "pending", "inflight", "ended", "vms"):
            pipe.delete(_k(batch, part))
        meta: dict[Any, Any] = {
            "plan": json.dumps(plan),
            "max_parallel": max_parallel or UNLIMITED,
            "created": time.time(),
        }
        pipe.hset(_k(batch, "meta"), mapping=meta)
        for index, vm in enumerate(plan["vms"]):
            pipe.rpush(_k(batch, "vms"), vm["id"])
            pipe.zadd(_k(batch, "pending"), {vm["id"]: priority_score(vm["priority"], index)})
        pipe.zadd(BATCHES_INDEX, {batch: time.time()})
        for part in ("meta", "pending", "vms"):
            pipe.expire(_k(batch, part), BATCH_TTL_S)
        pipe.execute()

    def requeue(self, batch: str, vm_ids: list[str]) -> None:
        """Put VMs back in line (resume): they wait again and count as not ended."""
        plan = self.plan(batch)
        order = {vm["id"]: (vm["priority"], i) for i, vm in enumerate(plan["vms"])}
        pipe = self.client.pipeline()
        for vm_id in vm_ids:
            priority, index = order[vm_id]
            pipe.zadd(_k(batch, "pending"), {vm_id: priority_score(priority, index)})
            pipe.srem(_k(batch, "ended"), vm_id)
        pipe.execute()

    def exists(self, batch: str) -> bool:
        return bool(self.client.exists(_k(batch, "meta")))

    def plan(self, batch: str) -> dict[str, Any]:
        raw = self.client.hget(_k(batch, "meta"), "plan")
        if raw is None:
            raise KeyError(f"no batch {batch!r}")
        data: dict[str, Any] = json.loads(raw)
        return data

    def meta(self, batch: str) -> dict[str, str]:
        raw = self.client.hgetall(_k(batch, "meta"))
        return {_text(k): _text(v) for k, v in raw.items()}

    def set_meta(self, batch: str, **values: Any) -> None:
        mapping: dict[Any, Any] = {k: str(v) for k, v in values.items()}
        self.client.hset(_k(batch, "meta"), mapping=mapping)

    def vm_ids(self, batch: str) -> list[str]:
        return [_text(v) for v in self.client.lrange(_k(batch, "vms"), 0, -1)]

    def claim_next(self, batch: str) -> str | None:
        """The next VM to start, if the batch limit allows one more in flight."""
        keys = [_k(batch, "pending"), _k(batch, "inflight"), _k(batch, "meta")]
        got = self._claim(keys=keys)
        return _text(got) if got else None

    def drop_vm(self, batch: str, vm_id: str) -> None:
        """Take one VM out of line for good: it will not start, it counts as ended."""
        pipe = self.client.pipeline()
        pipe.zrem(_k(batch, "pending"), vm_id)
        pipe.sadd(_k(batch, "ended"), vm_id)
        pipe.execute()

    def drop_pending(self, batch: str) -> list[str]:
        """Take every waiting VM out of line (cancel); returns their ids."""
        key = _k(batch, "pending")
        pipe = self.client.pipeline()
        pipe.zrange(key, 0, -1)
        pipe.delete(key)
        ids, _ = pipe.execute()
        return [_text(v) for v in ids]

    def mark_ended(self, batch: str, vm_id: str) -> bool:
        """Release the VM's place in the batch; True only the first time."""
        return bool(self._end(keys=[_k(batch, "ended"), _k(batch, "inflight")], args=[vm_id]))

    def ended_ids(self, batch: str) -> set[str]:
        return {_text(v) for v in self.client.smembers(_k(batch, "ended"))}

    def pending_ids(self, batch: str) -> set[str]:
        members: list[Any] = list(self.client.zrange(_k(batch, "pending"), 0, -1))
        return {_text(v) for v in members}

    def unfinished(self) -> list[str]:
        """Batches that exist and have VMs that did not end (one round trip)."""
        names = self.batches()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(_k(name, "meta"))
            pipe.llen(_k(name, "vms"))
            pipe.scard(_k(name, "ended"))
        replies: list[Any] = pipe.execute()
        found = []
        for i, name in enumerate(names):
            exists, total, ended = replies[3 * i : 3 * i + 3]
            if exists and int(ended) < int(total):
                found.append(name)
        return found

    def counts(self, batch: str) -> BatchCounts:
        pipe = self.client.pipeline()
        pipe.llen(_k(batch, "vms"))
        pipe.zcard(_k(batch, "pending"))
        pipe.get(_k(batch, "inflight"))
        pipe.scard(_k(batch, "ended"))
        total, pending, inflight, ended = pipe.execute()
        return BatchCounts(int(total), int(pending), int(inflight or 0), int(ended))

    def batches(self) -> list[str]:
        names: list[Any] = list(self.client.zrange(BATCHES_INDEX, 0, -1))
        return [_text(b) for b in names]


def dispatch(store: BatchStore, batch: str, send: Callable[[str], object]) -> list[str]:
    """Start waiting VMs while the batch has room; returns the ids started."""
    started: list[str] = []
    while True:
        vm_id = store.claim_next(batch)
        if vm_id is None:
            return started
        send(vm_id)
        started.append(vm_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
