"""Host registry: which conversion hosts exist, what they offer, which are alive.

Each host publishes its `HostInfo` as JSON under `keys.host_key` with a TTL and
records itself, scored by the time of the beat, in `keys.hosts_index`. A host is
online exactly while its heartbeat key exists; once it stops beating the key
expires but the index still remembers when it was last seen, until `forget_host`.

Times of beats come from the Redis server clock, so `last_seen` of different hosts
compare correctly whatever their own clocks say. `started_at` is the host's own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, cast

import redis

from vmcraft_tasks import keys
from vmcraft_tasks.config import FleetSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostInfo:
    host_id: str
    backend: str
    limits: Mapping[str, int]
    free_slots: int
    image_roots: tuple[str, ...]
    pids: tuple[int, ...]  # worker processes on the host
    started_at: float  # epoch seconds, host clock
    last_seen: float = 0.0  # epoch seconds, Redis server clock; set by publish_heartbeat

    @classmethod
    def from_settings(
        cls,
        settings: FleetSettings,
        *,
        backend: str,
        free_slots: int,
        pids: tuple[int, ...],
        started_at: float,
    ) -> HostInfo:
        return cls(
            host_id=settings.host_id,
            backend=backend,
            limits={
                "max_attached": settings.max_attached,
                "max_mounts": settings.max_mounts,
                "max_conversions": settings.max_conversions,
            },
            free_slots=free_slots,
            image_roots=settings.image_roots,
            pids=pids,
            started_at=started_at,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "host_id": self.host_id,
                "backend": self.backend,
                "limits": dict(self.limits),
                "free_slots": self.free_slots,
                "image_roots": list(self.image_roots),
                "pids": list(self.pids),
                "started_at": self.started_at,
                "last_seen": self.last_seen,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> HostInfo:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            host_id=str(data["host_id"]),
            backend=str(data["backend"]),
            limits={str(k): int(v) for k, v in data["limits"].items()},
            free_slots=int(data["free_slots"]),
            image_roots=tuple(str(r) for r in data["image_roots"]),
            pids=tuple(int(p) for p in data["pids"]),
            started_at=float(data["started_at"]),
            last_seen=float(data["last_seen"]),
        )


@dataclass(frozen=True)
class HostStatus:
    host_id: str
    online: bool
    last_seen: float  # Redis server clock
    info: HostInfo | None  # the last published info while online; None once it expired


def server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def publish_heartbeat(client: redis.Redis, info: HostInfo, ttl_s: float) -> HostInfo:
    """Announce `info` for `ttl_s`; returns it stamped with the server's `last_seen`."""
    ttl_ms = round(ttl_s * 1000)
    if ttl_ms < 1:
        raise ValueError(f"ttl must be at least 1 ms, not {ttl_s} s")
    stamped = replace(info, last_seen=server_time(client))
    # Not a MULTI: the heartbeat (tagged by the host) and the fleet-wide index live in
    # different cluster slots. Both writes are idempotent; the next beat repeats them.
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.host_key(info.host_id), stamped.to_json(), px=ttl_ms)
    pipe.zadd(keys.hosts_index(), {info.host_id: stamped.last_seen})
    pipe.execute()
    return stamped


def list_hosts(client: redis.Redis) -> list[HostStatus]:
    """Every host that ever beat and was not forgotten, by host id."""
    # withscores=True always yields (member, score) pairs; the stub's union cannot say so.
    entries = cast(
        list[tuple[str, float]],
        client.zrange(keys.hosts_index(), 0, -1, withscores=True),
    )
    hosts = [(member, float(score)) for member, score in entries]
    # One GET per host rather than MGET: the hosts' keys live in different cluster slots.
    pipe = client.pipeline(transaction=False)
    for host, _ in hosts:
        pipe.get(keys.host_key(host))
    values: list[str | None] = pipe.execute()
    statuses = [
        HostStatus(host, raw is not None, last_seen, _parse(host, raw))
        for (host, last_seen), raw in zip(hosts, values, strict=True)
    ]
    return sorted(statuses, key=lambda s: s.host_id)


def forget_host(client: redis.Redis, host: str) -> bool:
    """Drop `host` from the registry; True if it was known."""
    pipe = client.pipeline(transaction=False)  # two slots: see publish_heartbeat
    pipe.delete(keys.host_key(host))
    pipe.zrem(keys.hosts_index(), host)
    deleted, removed = pipe.execute()
    return bool(deleted or removed)


def _parse(host: str, raw: str | None) -> HostInfo | None:
    if raw is None:
        return None
    try:
        return HostInfo.from_json(raw)
    except (ValueError, KeyError, TypeError, AttributeError):
        # One host publishing garbage must not hide the rest of the fleet.
        log.warning("unreadable heartbeat of host %s: %.200r", host, raw)
        return None


class Heartbeat:
    """Publish this host's info every `interval_s` from a daemon thread.

    Each beat first runs `on_beat` (e.g. `SlotLeases.refresh_all`), then publishes
    `info()`, so the published free slot count follows the refresh. A failing beat is
    logged and the next one tried: a short Redis outage must not end the heartbeat.
    """

    def __init__(
        self,
        client: redis.Redis,
        info: Callable[[], HostInfo],
        *,
        interval_s: float,
        ttl_s: float,
        on_beat: Callable[[], object] | None = None,
    ) -> None:
        if not 0 < interval_s < ttl_s:
            raise ValueError(
                f"the heartbeat interval must be positive and shorter than its ttl "
                f"(got {interval_s} s and {ttl_s} s)"
            )
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.last: HostInfo | None = None
        self._client = client
        self._info = info
        self._on_beat = on_beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def beat(self) -> HostInfo:
        """One beat, now, in the caller's thread."""
        if self._on_beat is not None:
            try:
                self._on_beat()
            except Exception:
                log.exception("heartbeat callback failed")
        self.last = publish_heartbeat(self._client, self._info(), self.ttl_s)
        return self.last

    def start(self, *, first_must_succeed: bool = True) -> None:
        """Beat once now, then keep beating in the background.

        With `first_must_succeed` the first beat's error propagates (a host that cannot
        announce itself should not start); without it the error is logged and the
        thread starts anyway: a worker whose broker is down at that moment must still
        register itself once the broker is back.
        """
        if self.running:
            raise RuntimeError("heartbeat already running")
        self._stop = threading.Event()
        try:
            self.beat()
        except Exception:
            if first_must_succeed:
                raise
            log.exception("first heartbeat failed; retrying every %.1f s", self.interval_s)
        info = self.last or self._safe_info()
        host = info.host_id if info else "?"
        self._thread = threading.Thread(
            target=self._run, name=f"vmcraft-heartbeat-{host}", daemon=True
        )
        self._thread.start()

    def _safe_info(self) -> HostInfo | None:
        try:
            return self._info()
        except Exception:
            return None

    def stop(self, *, withdraw: bool = False, timeout_s: float = 5.0) -> None:
        """Stop beating. The host stays online until its key expires, unless `withdraw`
        deletes the key at once (a clean shutdown)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("heartbeat thread still busy after %.1f s", timeout_s)
        # After the join, so no beat in flight can bring the key back.
        if withdraw and self.last is not None:
            self._client.delete(keys.host_key(self.last.host_id))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:
                # An outage: one line per beat, not a traceback; the next beat retries.
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
