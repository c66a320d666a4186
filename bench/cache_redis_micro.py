"""Per-call cost of RedisScanCache: get hit, get miss, set, generation.

    .venv/bin/python -m bench.cache_redis_micro redis://127.0.0.1:6379/15 [calls]

Writes only under its own namespace (one entry, one generation key, one stats hash)
and deletes those keys afterwards, so any database will do.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from vmcraft_tasks.craft.cache import KIND_BLKID, cache_key
from vmcraft_tasks.rediscache import RedisScanCache

VALUE = {
    "TYPE": "ext4",
    "UUID": "6f1c2d1e-8d53-4b7e-a1f0-3e5c2f9d0b11",
    "LABEL": "root",
    "PARTUUID": "0f3b1e2a-77c4-4a51-9d0e-2b6c8f4e1a90",
    "PARTLABEL": "linux",
}


def _per_call_us(operation: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        operation()
    return (time.perf_counter() - started) / calls * 1e6


def measure(url: str, calls: int = 10_000) -> dict[str, float]:
    """Microseconds per call of each operation, after a warm-up (connection, script load)."""
    namespace = f"vmcraft:bench:{os.getpid()}"
    cache = RedisScanCache.from_url(url, namespace=namespace)
    identity = "bench-disk"
    hit = cache_key(identity, 0, KIND_BLKID, "p1")
    miss = cache_key(identity, 0, KIND_BLKID, "p2")
    cache.set(hit, VALUE, 600)
    cache.get(hit, KIND_BLKID)
    try:
        return {
            "get_hit": _per_call_us(lambda: cache.get(hit, KIND_BLKID), calls),
            "get_miss": _per_call_us(lambda: cache.get(miss, KIND_BLKID), calls),
            "set": _per_call_us(lambda: cache.set(hit, VALUE, 600), calls),
            "generation": _per_call_us(lambda: cache.generation(identity), calls),
        }
    finally:
        keys = (hit, f"gen:{identity}", "stats")
        cache.client.delete(*(f"{namespace}:{k}" for k in keys))
        cache.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} REDIS_URL [CALLS]", file=sys.stderr)
        return 2
    calls = int(argv[2]) if len(argv) == 3 else 10_000
    for name, micros in measure(argv[1], calls).items():
        print(f"{name:<12} {micros:8.1f} us/call  ({calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
