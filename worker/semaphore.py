"""A host-wide counting semaphore in Redis, for the per-host limits.

Holders are the members of a ZSET scored by their expiry time. Every acquire first
drops expired holders, so the place of a process that crashed while holding comes
back after `ttl_s` with no one cleaning up. Expiry times come from the Redis
server's own clock (`TIME` inside the scripts): the hosts' clocks never take part,
so clock skew between hosts cannot let one host evict another's live holders.

Each place also names its holder (a `worker.steps.Holder`: host, pid, process start
time, task id) in a companion hash, `<key>:holders`. The TTL is short (minutes, a
few heartbeats): the host's reconciler renews the places of holders that are still
alive and evicts, at once, the places of holders that are dead. A place taken
without a holder (a test, an operator) is left to its TTL.

Waiting is polling, not a queue: waiters are not served in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from worker.steps import Holder, current_holder

log = logging.getLogger(__name__)

# Milliseconds of Redis server time; a double holds them exactly.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Expired places go first, with their holder records.
_DROP_EXPIRED = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, token in ipairs(expired) do redis.call('HDEL', KEYS[2], token) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
"""

# A token that already holds is renewed, not counted twice: a retried task must not
# eat a second place (its holder record is replaced: the new run owns the place).
# The keys' own TTL only lets a semaphore whose holders all vanished disappear.
_ACQUIRE = (
    _NOW
    + _DROP_EXPIRED
    + """
local ttl = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1])
   or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  else
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
  return 1
end
return 0
"""
)

# An expired holder is not renewed: its place may already belong to someone else.
_REFRESH = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
  for _, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
  return 1
end
return 0
"""
)

_RELEASE = """
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# Evict only the holder the caller judged dead: a new run of the same step may have
# taken the same token since.
_EVICT = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

_HOLDERS = (
    _NOW
    + """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%d', now), '+inf')
local out = {}
for _, token in ipairs(live) do
  table.insert(out, token)
  table.insert(out, redis.call('HGET', KEYS[2], token) or '')
end
return out
"""
)


class LimitReached(Exception):
    """A per-host limit was full for the whole time the caller was willing to wait."""

    def __init__(self, key: str, limit: int, waited_s: float) -> None:
        self.key = key
        self.limit = limit
        self.waited_s = waited_s
        super().__init__(f"{key}: all {limit} places taken; gave up after {waited_s:.3f} s")


class WaitStopped(Exception):
    """`should_stop` asked a waiter to give up before a place came free."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: stopped waiting for a place: {reason}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisSemaphore:
    """At most `limit` holders of `key` at once; a holder lapses after `ttl_s`."""

    def __init__(self, client: redis.Redis, key: str, limit: int, ttl_s: float) -> None:
        if limit < 1:
            raise ValueError(f"a semaphore limit must be at least 1, not {limit}")
        ttl_ms = round(ttl_s * 1000)
        if ttl_ms < 1:
            raise ValueError(f"ttl must be at least 1 ms, not {ttl_s} s")
        self.key = key
        # Same hash tag as the key (it holds `{host}`): one cluster slot for both.
        self.holders_key = f"{key}:holders"
        self.limit = limit
        self.ttl_s = ttl_s
        self._ttl_ms = ttl_ms
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._evict = client.register_script(_EVICT)
        self._holders = client.register_script(_HOLDERS)

    @property
    def _keys(self) -> list[str]:
        return [self.key, self.holders_key]

    def try_acquire(self, token: str, holder: Holder | None = None) -> bool:
        """Take a place now if one is free (or `token` already holds one); never waits.

        `holder` defaults to the step this thread is running (`worker.steps`).
        """
        _check_token(token)
        holder = holder or current_holder()
        args: list[str | int] = [
            token,
            self.limit,
            self._ttl_ms,
            holder.to_json() if holder else "",
        ]
        return bool(self._acquire(keys=self._keys, args=args))

    def acquire(
        self,
        token: str,
        timeout_s: float,
        poll_s: float = 0.005,
        *,
        holder: Holder | None = None,
        should_stop: Callable[[], str | None] | None = None,
    ) -> bool:
        """Take a place, polling for at most `timeout_s`; False if none came free.

        `should_stop()` is asked between polls; a reason from it raises `WaitStopped`
        (a warm shutdown must not sit out an hours-long wait).
        """
        if timeout_s < 0 or poll_s <= 0:
            raise ValueError(f"need timeout_s >= 0 and poll_s > 0 (got {timeout_s}, {poll_s})")
        deadline = time.monotonic() + timeout_s
        while True:
            if self.try_acquire(token, holder):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if should_stop is not None and (reason := should_stop()):
                raise WaitStopped(self.key, reason)
            time.sleep(min(poll_s, remaining))

    def release(self, token: str) -> bool:
        """Give the place back; False if `token` did not hold one (or it had lapsed)."""
        _check_token(token)
        return int(self._release(keys=self._keys, args=[token])) > 0

    def refresh(self, token: str) -> bool:
        """Extend `token`'s place to `ttl_s` from now; False if it no longer holds one."""
        _check_token(token)
        return bool(self._refresh(keys=self._keys, args=[token, self._ttl_ms]))

    def evict(self, token: str, holder: Holder) -> bool:
        """Free `token`'s place if `holder` (judged dead) still holds it."""
        _check_token(token)
        return int(self._evict(keys=self._keys, args=[token, holder.to_json()])) > 0

    def holders(self) -> list[str]:
        """Tokens holding a place now, expired ones left out."""
        return list(self.holders_detail())

    def holders_detail(self) -> dict[str, Holder | None]:
        """Token -> its holder (None when it was taken without one), live places only."""
        raw: list[bytes | str] = self._holders(keys=self._keys)
        found: dict[str, Holder | None] = {}
        for i in range(0, len(raw) - 1, 2):
            recorded = _text(raw[i + 1])
            found[_text(raw[i])] = Holder.from_json(recorded) if recorded else None
        return found

    @contextmanager
    def hold(
        self,
        token: str,
        timeout_s: float,
        *,
        poll_s: float = 0.005,
        should_stop: Callable[[], str | None] | None = None,
    ) -> Iterator[None]:
        """Hold a place for the `with` block; `LimitReached` if none came free in time."""
        started = time.monotonic()
        if not self.acquire(token, timeout_s, poll_s, should_stop=should_stop):
            raise LimitReached(self.key, self.limit, time.monotonic() - started)
        try:
            yield
        finally:
            try:
                self.release(token)
            except redis.RedisError as exc:
                # Never hide the block's own outcome behind a broker error: a place
                # that could not be given back lapses with its TTL, or the reconciler
                # frees it once this holder's step has ended.
                log.warning("could not release %s of %s: %s", token, self.key, exc)


def _check_token(token: str) -> None:
    if not token:
        raise ValueError("a semaphore token must not be empty")
