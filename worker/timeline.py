"""Facts recorded for tests and benchmarks: when each operation ran, on which host.

Recording is one pipelined round trip; lists expire a day after their last append
so a forgotten benchmark leaves nothing behind. Times are whatever clock the caller
uses (time.monotonic on one host, time.time across hosts); compare like with like.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from vmcraft_tasks import keys

RETENTION_S = 24 * 60 * 60


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    ident: str


# Six positional parameters: the signature callers already use.
def record_interval(  # noqa: PLR0917
    client: redis.Redis, host: str, kind: str, start: float, end: float, ident: str
) -> None:
    if end < start:
        raise ValueError(f"interval {ident!r} ends ({end}) before it starts ({start})")
    key = keys.events_key(host, kind)
    pipe = client.pipeline(transaction=False)
    pipe.rpush(key, json.dumps({"start": start, "end": end, "ident": ident}))
    pipe.expire(key, RETENTION_S)
    pipe.execute()


def intervals(client: redis.Redis, host: str, kind: str) -> list[Interval]:
    """Recorded intervals in the order they were recorded."""
    raw: list[bytes | str] = client.lrange(keys.events_key(host, kind), 0, -1)
    found = []
    for item in raw:
        data = json.loads(item)
        found.append(Interval(float(data["start"]), float(data["end"]), str(data["ident"])))
    return found


def max_overlap(spans: Iterable[tuple[float, float]]) -> int:
    """The most intervals in progress at one instant.

    Intervals are half-open, [start, end): one ending exactly when another starts
    does not overlap it, and an empty interval (start == end) overlaps nothing.
    """
    events: list[tuple[float, int]] = []
    for start, end in spans:
        if end < start:
            raise ValueError(f"interval ({start}, {end}) ends before it starts")
        if end > start:
            events += [(start, 1), (end, -1)]
    # At equal times -1 sorts before +1: ends are counted before starts.
    events.sort()
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak
