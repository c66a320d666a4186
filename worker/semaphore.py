"""A host-wide counting semaphore in Redis, for the per-host limits.

Holders are the members of a ZSET scored by their expiry time. Every acquire first
drops expired holders, so the place of a process that crashed while holding comes
back after `ttl_s` with no one cleaning up. Expiry times come from the Redis
server's own clock (`TIME` inside the scripts): the hosts' clocks never take part,
so clock skew between hosts cannot let one host evict another's live holders.

Waiting is polling, not a queue: waiters are not served in order. A holder that
may hold longer than `ttl_s` must call `refresh` (the host heartbeat can).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

# Milliseconds of Redis server time; a double holds them exactly.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A token that already holds is renewed, not counted twice: a retried task must not
# eat a second place. The key's own TTL only lets a semaphore whose holders all
# vanished disappear; it is never shortened below the newest holder's expiry.
_ACQUIRE = (
    _NOW
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1])
   or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
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
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  return 1
end
return 0
"""
)

_HOLDERS = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%d', now), '+inf')
"""
)


class LimitReached(Exception):
    """A per-host limit was full for the whole time the caller was willing to wait."""

    def __init__(self, key: str, limit: int, waited_s: float) -> None:
        self.key = key
        self.limit = limit
        self.waited_s = waited_s
        super().__init__(f"{key}: all {limit} places taken; gave up after {waited_s:.3f} s")


class RedisSemaphore:
    """At most `limit` holders of `key` at once; a holder lapses after `ttl_s`."""

    def __init__(self, client: redis.Redis, key: str, limit: int, ttl_s: float) -> None:
        if limit < 1:
            raise ValueError(f"a semaphore limit must be at least 1, not {limit}")
        ttl_ms = round(ttl_s * 1000)
        if ttl_ms < 1:
            raise ValueError(f"ttl must be at least 1 ms, not {ttl_s} s")
        self.key = key
        self.limit = limit
        self.ttl_s = ttl_s
        self._ttl_ms = ttl_ms
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)
        self._holders = client.register_script(_HOLDERS)

    def try_acquire(self, token: str) -> bool:
        """Take a place now if one is free (or `token` already holds one); never waits."""
        _check_token(token)
        return bool(self._acquire(keys=[self.key], args=[token, self.limit, self._ttl_ms]))

    def acquire(self, token: str, timeout_s: float, poll_s: float = 0.005) -> bool:
        """Take a place, polling for at most `timeout_s`; False if none came free."""
        if timeout_s < 0 or poll_s <= 0:
            raise ValueError(f"need timeout_s >= 0 and poll_s > 0 (got {timeout_s}, {poll_s})")
        deadline = time.monotonic() + timeout_s
        while True:
            if self.try_acquire(token):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(poll_s, remaining))

    def release(self, token: str) -> bool:
        """Give the place back; False if `token` did not hold one (or it had lapsed)."""
        _check_token(token)
        return int(self._client.zrem(self.key, token)) > 0

    def refresh(self, token: str) -> bool:
        """Extend `token`'s place to `ttl_s` from now; False if it no longer holds one."""
        _check_token(token)
        return bool(self._refresh(keys=[self.key], args=[token, self._ttl_ms]))

    def holders(self) -> list[str]:
        """Tokens holding a place now, expired ones left out."""
        raw: list[bytes | str] = self._holders(keys=[self.key])
        return [t.decode() if isinstance(t, bytes) else t for t in raw]

    @contextmanager
    def hold(self, token: str, timeout_s: float) -> Iterator[None]:
        """Hold a place for the `with` block; `LimitReached` if none came free in time."""
        started = time.monotonic()
        if not self.acquire(token, timeout_s):
            raise LimitReached(self.key, self.limit, time.monotonic() - started)
        try:
            yield
        finally:
            self.release(token)


def _check_token(token: str) -> None:
    if not token:
        raise ValueError("a semaphore token must not be empty")
