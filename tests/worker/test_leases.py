"""NBD slot leases against a real Redis: exclusivity, expiry, ownership, refresh."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from vmcraft_tasks import keys
from worker.leases import HOST_SLOTS_LOCK, Lease, SlotLeases

HOST = "conv-01"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def test_takes_the_lowest_free_slot(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=4, ttl_s=5)
    assert [leases.acquire(f"t{i}") for i in range(3)] == [
        Lease(HOST, 0, "t0"),
        Lease(HOST, 1, "t1"),
        Lease(HOST, 2, "t2"),
    ]
    assert leases.release("t1")
    assert leases.acquire("t3") == Lease(HOST, 1, "t3")
    assert leases.held() == {0: "t0", 1: "t3", 2: "t2"}
    assert leases.free_count() == 1


def test_full_host_returns_none_at_once(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=2, ttl_s=5)
    assert leases.acquire("a") and leases.acquire("b")
    started = time.monotonic()
    assert leases.acquire("c") is None
    assert time.monotonic() - started < 0.5
    assert leases.free_count() == 0


def test_same_owner_gets_its_slot_back(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=4, ttl_s=5)
    first = leases.acquire("task-1")
    leases.acquire("task-2")
    assert leases.acquire("task-1") == first
    assert leases.held() == {0: "task-1", 1: "task-2"}
    assert leases.owner_of("task-1") == first
    assert leases.owner_of("nobody") is None


def test_hosts_do_not_share_slots(client: redis.Redis) -> None:
    a = SlotLeases(client, "host-a", slots=1, ttl_s=5)
    b = SlotLeases(client, "host-b", slots=1, ttl_s=5)
    assert a.acquire("x") == Lease("host-a", 0, "x")
    assert b.acquire("y") == Lease("host-b", 0, "y")
    assert a.acquire("z") is None


@pytest.mark.parametrize("use_lock_file", [False, True])
def test_eight_threads_race_for_four_slots(
    client: redis.Redis, tmp_path: Path, use_lock_file: bool
) -> None:
    work_dir = str(tmp_path) if use_lock_file else None
    leases = SlotLeases(client, HOST, slots=4, ttl_s=5, work_dir=work_dir)
    start = threading.Barrier(8)

    def attempt(i: int) -> Lease | None:
        start.wait()
        return leases.acquire(f"thread-{i}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    won = [r for r in results if r is not None]
    assert len(won) == 4
    assert sorted(r.slot for r in won) == [0, 1, 2, 3]
    assert leases.held() == {r.slot: r.owner for r in won}
    assert os.path.exists(tmp_path / HOST_SLOTS_LOCK) == use_lock_file


def _race_in_process(url: str, index: int, start: Any, out: Any) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    leases = SlotLeases(client, HOST, slots=4, ttl_s=5)
    start.wait(10)
    won = []
    for n in range(3):
        lease = leases.acquire(f"proc-{index}-{n}")
        if lease is not None:
            won.append((lease.slot, lease.owner))
    out.put(won)
    client.close()


def test_three_processes_race_for_four_slots(client: redis.Redis, redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_race_in_process, args=(redis_url, i, start, out)) for i in range(3)
    ]
    for p in procs:
        p.start()
    try:
        won = [pair for _ in procs for pair in out.get(timeout=10)]
    finally:
        for p in procs:
            p.join(10)
    assert all(p.exitcode == 0 for p in procs)
    assert len(won) == 4
    assert sorted(slot for slot, _ in won) == [0, 1, 2, 3]
    assert SlotLeases(client, HOST, slots=4, ttl_s=5).held() == dict(won)


def test_lease_expires_after_ttl(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=1, ttl_s=0.3)
    stale = leases.acquire("crashed")
    assert stale is not None
    assert leases.acquire("next") is None
    time.sleep(0.4)
    assert leases.free_count() == 1
    assert leases.acquire("next") == Lease(HOST, 0, "next")
    # The former owner's late release must not free the new owner's lease.
    assert not leases.release(stale)
    assert leases.held() == {0: "next"}


def test_release_by_a_non_owner_does_nothing(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=2, ttl_s=5)
    mine = leases.acquire("mine")
    assert mine is not None
    assert not leases.release("other")
    assert not leases.release(Lease(HOST, mine.slot, "other"))
    assert leases.held() == {0: "mine"}
    assert leases.release(mine)
    assert not leases.release(mine)
    assert leases.held() == {}


def test_release_of_a_foreign_lease_is_an_error(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=2, ttl_s=5)
    with pytest.raises(ValueError):
        leases.release(Lease("elsewhere", 0, "x"))
    with pytest.raises(ValueError):
        leases.release(Lease(HOST, 7, "x"))


def test_refresh_extends_leases(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=3, ttl_s=0.5)
    leases.acquire("a")
    leases.acquire("b")
    time.sleep(0.3)
    assert leases.refresh_all() == 2
    assert client.pttl(keys.slot_key(HOST, 0)) > 400
    time.sleep(0.3)  # 0.6 s after acquire: alive only thanks to the refresh
    assert leases.held() == {0: "a", 1: "b"}


def test_refresh_only_the_given_owners(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=3, ttl_s=0.5)
    leases.acquire("a")
    leases.acquire("b")
    time.sleep(0.3)
    assert leases.refresh_all({"b", "not-here"}) == 1
    assert leases.refresh_all(set()) == 0
    time.sleep(0.3)
    assert leases.held() == {1: "b"}


def test_keys_are_namespaced_and_hold_no_device(client: redis.Redis) -> None:
    leases = SlotLeases(client, HOST, slots=2, ttl_s=5)
    leases.acquire("a")
    stored = [str(k) for k in client.keys("*")]
    assert stored == [keys.slot_key(HOST, 0)]
    assert stored[0].startswith(keys.PREFIX)
    assert "/dev" not in stored[0]
    with pytest.raises(keys.KeyPartError):
        keys.slot_key("/dev/nbd0", 0)


def test_invalid_arguments(client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        SlotLeases(client, HOST, slots=0, ttl_s=5)
    with pytest.raises(ValueError):
        SlotLeases(client, HOST, slots=1, ttl_s=0)
    with pytest.raises(ValueError):
        SlotLeases(client, HOST, slots=1, ttl_s=5).acquire("")
