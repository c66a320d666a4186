"""Scan caches: partition tables and blkid results, with TTLs and generations.

Keys name the disk's identity plus a generation, never a device path: device
numbers (/dev/nbd3, /dev/loop7) are reused by the next attach and would serve
another disk's answers. A write to the disk bumps its generation, so every older
key becomes unreachable and simply expires.

Values are JSON-compatible (dicts and lists) so the Redis implementation that
the fleet uses stores exactly what this in-process one does.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any

KIND_PARTITIONS = "partitions"
KIND_BLKID = "blkid"


@dataclass
class CacheTTL:
    """Public TTL settings, seconds. Defaults follow the performance guide."""

    partitions_s: float = 60.0
    blkid_s: float = 120.0

    def for_kind(self, kind: str) -> float:
        return self.partitions_s if kind == KIND_PARTITIONS else self.blkid_s


def cache_key(disk_identity: str, generation: int, kind: str, detail: str = "") -> str:
    return f"{disk_identity}:g{generation}:{kind}:{detail}"


class ScanCache(ABC):
    """Interface shared by the in-process and Redis caches."""

    @abstractmethod
    def get(self, key: str, kind: str) -> Any | None:
        """The cached value, or None; counts a hit or a miss for `kind`."""

    @abstractmethod
    def set(self, key: str, value: Any, ttl_s: float) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def generation(self, disk_identity: str) -> int: ...

    @abstractmethod
    def bump_generation(self, disk_identity: str) -> int:
        """Make every key of this disk unreachable; returns the new generation."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters such as `partitions_hits`, `blkid_misses`."""


class InProcessTTLCache(ScanCache):
    """The library default: a dict with expiry times, safe across threads."""

    def __init__(self, *, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Any]] = {}
        self._generations: dict[str, int] = {}
        self._counters: Counter[str] = Counter()

    def get(self, key: str, kind: str) -> Any | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] <= now:
                del self._entries[key]
                entry = None
            self._counters[f"{kind}_{'hits' if entry else 'misses'}"] += 1
        # Stored as JSON text, like the Redis cache: every hit hands out a fresh copy a
        # caller may mutate, and decoding is cheaper than a deep copy.
        return json.loads(entry[1]) if entry else None

    def set(self, key: str, value: Any, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock() + ttl_s, json.dumps(value))

    def delete(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def generation(self, disk_identity: str) -> int:
        with self._lock:
            return self._generations.get(disk_identity, 0)

    def bump_generation(self, disk_identity: str) -> int:
        with self._lock:
            gen = self._generations.get(disk_identity, 0) + 1
            self._generations[disk_identity] = gen
            prefix = f"{disk_identity}:"
            # Unreachable now; drop them at once rather than wait for expiry.
            for key in [k for k in self._entries if k.startswith(prefix)]:
                del self._entries[key]
            return gen

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)


class NullCache(ScanCache):
    """Caching switched off: every get is a miss."""

    def __init__(self) -> None:
        self._counters: Counter[str] = Counter()

    def get(self, key: str, kind: str) -> Any | None:
        self._counters[f"{kind}_misses"] += 1
        return None

    def set(self, key: str, value: Any, ttl_s: float) -> None:
        return None

    def delete(self, key: str) -> None:
        return None

    def generation(self, disk_identity: str) -> int:
        return 0

    def bump_generation(self, disk_identity: str) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        return dict(self._counters)
