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

from vmcraft_tasks import keys, luascripts
from worker.steps import Holder, current_holder

log = logging.getLogger(__name__)


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
        self.holders_key = keys.semaphore_holders_key(key)
        self.limit = limit
        self.ttl_s = ttl_s
        self._ttl_ms = ttl_ms
        self._client = client
        # lua/semaphore_*.lua; KEYS: the holders zset and the holder hash.
        self._acquire = luascripts.register(client, "semaphore_acquire")
        self._refresh = luascripts.register(client, "semaphore_refresh")
        self._release = luascripts.register(client, "semaphore_release")
        self._evict = luascripts.register(client, "semaphore_evict")
        self._holders = luascripts.register(client, "semaphore_holders")

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
        raw: list[str] = self._holders(keys=self._keys)
        found: dict[str, Holder | None] = {}
        for i in range(0, len(raw) - 1, 2):
            recorded = raw[i + 1]
            found[raw[i]] = Holder.from_json(recorded) if recorded else None
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
