"""The fleet's scan cache: `ScanCache` on Redis, shared by every worker process and host.

Lives outside `vmcraft_tasks.craft` on purpose: the craft library must run
without redis installed, so only the fleet imports this module.

Every operation is exactly one round trip (a GET hit costs one EVALSHA that both
reads the value and counts the hit), so a warm scan stays far below a
millisecond per lookup against a local Redis. Generations are never cached in
the process: another worker may bump them at any moment.

A dead Redis raises `CacheUnavailableError` instead of answering "miss": a
cache that silently went empty would turn every scan of the fleet into a real
sfdisk/blkid run without anybody noticing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from vmcraft_tasks import keys, luascripts
from vmcraft_tasks.craft.cache import ScanCache
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.urls import mask_url

# Keys: `vmcraft_tasks.keys.cache_*`, all of one namespace under one hash tag (the
# GET script touches an entry and the stats hash). Values are JSON text.
DEFAULT_NAMESPACE = keys.CACHE_NAMESPACE

# Longer than any sane entry TTL: entries are clamped to half of it (see `set`), so a
# generation key can only expire after every entry naming it already has.
DEFAULT_GENERATION_TTL_S = 7 * 24 * 3600.0

T = TypeVar("T")


class CacheUnavailableError(VMCraftError):
    """The Redis behind the scan cache cannot be reached (refused, timed out, auth failed)."""

    def __init__(self, url: str, namespace: str, reason: str) -> None:
        self.url = url
        self.namespace = namespace
        self.reason = reason
        super().__init__(f"scan cache {url} (namespace {namespace}) unavailable: {reason}")


class RedisScanCache(ScanCache):
    """Scan results, generations and hit/miss counters in one Redis database."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        generation_ttl_s: float = DEFAULT_GENERATION_TTL_S,
    ) -> None:
        if generation_ttl_s <= 0:
            raise ValueError("generation_ttl_s must be positive")
        keys.cache_prefix(namespace)  # KeyPartError for a namespace that cannot be one
        self.client = client
        self.namespace = namespace
        self.url = _describe_client(client)
        self._generation_ttl_ms = _to_ms(generation_ttl_s)
        self._max_entry_ttl_ms = max(1, self._generation_ttl_ms // 2)
        self._stats_key = keys.cache_stats_key(namespace)
        # EVALSHA (lua/cache_get_and_count.lua); the script is loaded on first use (and
        # again after a SCRIPT FLUSH). The client must decode responses.
        self._get_and_count = luascripts.register(client, "cache_get_and_count")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        generation_ttl_s: float = DEFAULT_GENERATION_TTL_S,
        **redis_kwargs: Any,
    ) -> RedisScanCache:
        """A cache on its own client; `redis_kwargs` override the timeouts chosen here.

        redis-py's default (5 s timeouts, 10 retries with backoff) would stall a scan
        for many seconds on a dead cache. Here a dropped connection is still retried
        (3 times, at most 0.1 s apart); a refused connection fails in about 0.1 s, an
        unresponsive host within a few seconds.
        """
        options: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "socket_timeout": 1.0,
            "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=3),
            "decode_responses": True,  # values are JSON text
        }
        options.update(redis_kwargs)
        client = redis.Redis.from_url(url, **options)
        cache = cls(client, namespace=namespace, generation_ttl_s=generation_ttl_s)
        cache.url = mask_url(url)
        return cache

    # -- ScanCache ----------------------------------------------------------------

    def get(self, key: str, kind: str) -> Any | None:
        raw = self._call(
            lambda: self._get_and_count(keys=[self._entry_key(key), self._stats_key], args=[kind])
        )
        return None if raw is None else json.loads(raw)

    def set(self, key: str, value: Any, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        payload = json.dumps(value, separators=(",", ":"))
        ttl_ms = min(_to_ms(ttl_s), self._max_entry_ttl_ms)
        self._call(lambda: self.client.set(self._entry_key(key), payload, px=ttl_ms))

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete(self._entry_key(key)))

    def generation(self, disk_identity: str) -> int:
        # GETEX rather than GET: a generation still being read must not expire under
        # the entries written with it (same single round trip).
        gen_key = self._generation_key(disk_identity)
        raw = self._call(lambda: self.client.getex(gen_key, px=self._generation_ttl_ms))
        return 0 if raw is None else int(raw)

    def bump_generation(self, disk_identity: str) -> int:
        # Older keys are not scanned or deleted: they are unreachable now and expire by TTL.
        gen_key = self._generation_key(disk_identity)
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(gen_key)
        pipe.pexpire(gen_key, self._generation_ttl_ms)
        new_generation, _ = self._call(pipe.execute)
        return int(new_generation)

    def stats(self) -> dict[str, int]:
        raw: dict[str, str] = self._call(lambda: self.client.hgetall(self._stats_key))  # type: ignore[arg-type,return-value]
        return {field: int(count) for field, count in raw.items()}

    # -- helpers ------------------------------------------------------------------

    def close(self) -> None:
        self.client.close()

    def _entry_key(self, key: str) -> str:
        return keys.cache_entry_key(self.namespace, key)

    def _generation_key(self, disk_identity: str) -> str:
        return keys.cache_generation_key(self.namespace, disk_identity)

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise CacheUnavailableError(self.url, self.namespace, str(exc) or repr(exc)) from exc


def _to_ms(seconds: float) -> int:
    # Rounded up: a positive TTL must never become PX 0, which Redis rejects.
    return max(1, math.ceil(seconds * 1000))


def _describe_client(client: redis.Redis) -> str:
    """A password-free URL for a client built without one, for error messages."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
