"""The host-wide counting semaphore against a real Redis."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from vmcraft_tasks import keys
from worker.semaphore import LimitReached, RedisSemaphore
from worker.timeline import intervals, max_overlap, record_interval

HOST = "conv-01"
KEY = keys.semaphore_key(HOST, "mounts")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def test_admits_up_to_the_limit(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=2, ttl_s=5)
    assert sem.try_acquire("a")
    assert sem.try_acquire("b")
    assert not sem.try_acquire("c")
    assert sorted(sem.holders()) == ["a", "b"]
    assert sem.release("a")
    assert not sem.release("a")
    assert sem.try_acquire("c")
    assert sorted(sem.holders()) == ["b", "c"]


def test_same_token_holds_one_place(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=2, ttl_s=5)
    assert sem.try_acquire("task")
    assert sem.try_acquire("task")
    assert sem.holders() == ["task"]
    assert sem.try_acquire("other")


def test_never_exceeds_the_limit_under_ten_threads(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=3, ttl_s=5)
    guard = threading.Lock()
    inside = peak = 0
    start = threading.Barrier(10)

    def work(i: int) -> None:
        nonlocal inside, peak
        start.wait()
        for n in range(3):
            token = f"t{i}-{n}"
            assert sem.acquire(token, timeout_s=5)
            begun = time.monotonic()
            with guard:
                inside += 1
                peak = max(peak, inside)
            time.sleep(0.02)
            with guard:
                inside -= 1
            ended = time.monotonic()
            sem.release(token)
            record_interval(client, HOST, "mount", begun, ended, token)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(work, range(10)))
    assert peak == 3
    recorded = intervals(client, HOST, "mount")
    assert len(recorded) == 30
    assert max_overlap([(r.start, r.end) for r in recorded]) == 3
    assert sem.holders() == []


def test_expired_holder_is_evicted(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=0.3)
    assert sem.try_acquire("crashed")
    assert not sem.try_acquire("next")
    time.sleep(0.35)
    assert sem.holders() == []
    assert sem.try_acquire("next")
    assert sem.holders() == ["next"]


def test_place_of_a_dead_process_comes_back(client: redis.Redis, redis_url: str) -> None:
    # A real process takes the only place and dies without releasing it.
    code = (
        "import os, redis\n"
        "from worker.semaphore import RedisSemaphore\n"
        f"c = redis.Redis.from_url({redis_url!r}, decode_responses=True)\n"
        f"assert RedisSemaphore(c, {KEY!r}, limit=1, ttl_s=0.5).try_acquire('doomed')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=10, cwd=REPO)
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    assert sem.holders() == ["doomed"]
    assert not sem.try_acquire("survivor")
    assert sem.acquire("survivor", timeout_s=1.5)
    assert sem.holders() == ["survivor"]


def test_acquire_gives_up_after_timeout(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    sem.try_acquire("holder")
    started = time.monotonic()
    assert not sem.acquire("waiter", timeout_s=0.1)
    assert 0.1 <= time.monotonic() - started < 1.0
    assert not sem.acquire("waiter", timeout_s=0)


def test_acquire_waits_for_a_release(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    sem.try_acquire("holder")
    timer = threading.Timer(0.1, sem.release, args=("holder",))
    timer.start()
    try:
        assert sem.acquire("waiter", timeout_s=2)
    finally:
        timer.join()
    assert sem.holders() == ["waiter"]


def test_hold_releases_on_exit_and_on_error(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    with sem.hold("a", timeout_s=0.1):
        assert sem.holders() == ["a"]
    assert sem.holders() == []
    with pytest.raises(RuntimeError), sem.hold("b", timeout_s=0.1):
        raise RuntimeError("conversion failed")
    assert sem.holders() == []


def test_limit_reached_carries_its_fields(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    sem.try_acquire("holder")
    with pytest.raises(LimitReached) as caught, sem.hold("late", timeout_s=0.05):
        pytest.fail("must not enter")
    err = caught.value
    assert err.key == KEY
    assert err.limit == 1
    assert 0.05 <= err.waited_s < 1.0
    assert KEY in str(err)
    assert sem.holders() == ["holder"]


def test_refresh_extends_a_live_holder_only(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=2, ttl_s=0.5)
    sem.try_acquire("long")
    sem.try_acquire("short")
    time.sleep(0.3)
    assert sem.refresh("long")
    time.sleep(0.3)  # 0.6 s after acquire: only the refreshed holder is left
    assert sem.holders() == ["long"]
    assert not sem.refresh("short")
    assert not sem.refresh("never")


def test_key_disappears_when_all_holders_lapse(client: redis.Redis) -> None:
    sem = RedisSemaphore(client, KEY, limit=2, ttl_s=0.2)
    sem.try_acquire("a")
    assert 0 < client.pttl(KEY) <= 200
    time.sleep(0.3)
    assert client.exists(KEY) == 0


def test_invalid_arguments(client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        RedisSemaphore(client, KEY, limit=0, ttl_s=5)
    with pytest.raises(ValueError):
        RedisSemaphore(client, KEY, limit=1, ttl_s=0)
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    with pytest.raises(ValueError):
        sem.acquire("t", timeout_s=-1)
    with pytest.raises(ValueError):
        sem.try_acquire("")
