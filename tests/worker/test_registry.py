"""Host registry and heartbeat against a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import redis

from vmcraft_tasks import keys
from vmcraft_tasks.config import FleetSettings
from worker.leases import SlotLeases
from worker.registry import (
    Heartbeat,
    HostInfo,
    forget_host,
    list_hosts,
    publish_heartbeat,
    server_time,
)

INFO = HostInfo(
    host_id="conv-01",
    backend="fuse",
    limits={"max_attached": 4, "max_mounts": 4, "max_conversions": 2},
    free_slots=4,
    image_roots=("/srv/images",),
    pids=(101, 102),
    started_at=1_700_000_000.5,
)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 1.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_published_host_is_online_with_its_info(client: redis.Redis) -> None:
    before = server_time(client)
    stamped = publish_heartbeat(client, INFO, ttl_s=5)
    assert before <= stamped.last_seen <= server_time(client)
    [status] = list_hosts(client)
    assert status.host_id == "conv-01"
    assert status.online
    assert status.last_seen == pytest.approx(stamped.last_seen)
    assert status.info == stamped
    assert status.info is not None and status.info.limits["max_conversions"] == 2


def test_host_goes_offline_after_ttl_but_stays_known(client: redis.Redis) -> None:
    stamped = publish_heartbeat(client, INFO, ttl_s=0.2)
    time.sleep(0.3)
    [status] = list_hosts(client)
    assert not status.online
    assert status.info is None
    assert status.last_seen == pytest.approx(stamped.last_seen)


def test_hosts_are_listed_by_id(client: redis.Redis) -> None:
    publish_heartbeat(client, replace(INFO, host_id="conv-02"), ttl_s=5)
    publish_heartbeat(client, INFO, ttl_s=0.05)
    time.sleep(0.1)
    statuses = list_hosts(client)
    assert [(s.host_id, s.online) for s in statuses] == [("conv-01", False), ("conv-02", True)]


def test_forget_host(client: redis.Redis) -> None:
    publish_heartbeat(client, INFO, ttl_s=5)
    assert forget_host(client, "conv-01")
    assert not forget_host(client, "conv-01")
    assert list_hosts(client) == []
    assert client.keys("*") == []


def test_garbled_heartbeat_does_not_hide_the_fleet(client: redis.Redis) -> None:
    publish_heartbeat(client, INFO, ttl_s=5)
    publish_heartbeat(client, replace(INFO, host_id="conv-02"), ttl_s=5)
    client.set(keys.host_key("conv-02"), b"{not json")
    statuses = {s.host_id: s for s in list_hosts(client)}
    assert statuses["conv-01"].info is not None
    assert statuses["conv-02"].online and statuses["conv-02"].info is None


def test_info_from_settings_round_trips() -> None:
    settings = FleetSettings(host_id="conv-09", image_roots=("/a", "/b"), max_conversions=3)
    info = HostInfo.from_settings(
        settings, backend="kernel", free_slots=2, pids=(7,), started_at=12.5
    )
    assert info.limits == {"max_attached": 4, "max_mounts": 4, "max_conversions": 3}
    assert HostInfo.from_json(info.to_json()) == info


def test_heartbeat_marks_online_then_offline_after_stop(client: redis.Redis) -> None:
    beats = threading.Semaphore(0)
    heartbeat = Heartbeat(client, lambda: INFO, interval_s=0.05, ttl_s=0.3, on_beat=beats.release)
    heartbeat.start()
    try:
        assert list_hosts(client)[0].online  # online as soon as start returns
        for _ in range(3):  # and it keeps beating
            assert beats.acquire(timeout=1)
        first_seen = list_hosts(client)[0].last_seen
        assert wait_until(lambda: list_hosts(client)[0].last_seen > first_seen)
    finally:
        heartbeat.stop()
    assert not heartbeat.running
    assert list_hosts(client)[0].online  # until its key expires
    assert wait_until(lambda: not list_hosts(client)[0].online)


def test_stop_is_prompt(client: redis.Redis) -> None:
    heartbeat = Heartbeat(client, lambda: INFO, interval_s=10, ttl_s=30)
    heartbeat.start()
    started = time.monotonic()
    heartbeat.stop()
    assert time.monotonic() - started < 0.5
    assert not heartbeat.running


def test_stop_with_withdraw_goes_offline_at_once(client: redis.Redis) -> None:
    with Heartbeat(client, lambda: INFO, interval_s=0.05, ttl_s=5) as heartbeat:
        assert list_hosts(client)[0].online
    assert list_hosts(client)[0].online
    heartbeat.start()
    heartbeat.stop(withdraw=True)
    assert not list_hosts(client)[0].online


def test_failing_callback_does_not_stop_the_heartbeat(client: redis.Redis) -> None:
    calls = []

    def flaky() -> None:
        calls.append(time.monotonic())
        raise RuntimeError("lease refresh failed")

    heartbeat = Heartbeat(client, lambda: INFO, interval_s=0.03, ttl_s=1, on_beat=flaky)
    heartbeat.start()
    try:
        assert wait_until(lambda: len(calls) >= 3)
        assert heartbeat.running
        assert list_hosts(client)[0].online
    finally:
        heartbeat.stop()


def test_heartbeat_keeps_leases_alive_and_reports_free_slots(client: redis.Redis) -> None:
    leases = SlotLeases(client, "conv-01", slots=4, ttl_s=0.3)
    lease = leases.acquire("task-1")
    assert lease is not None
    heartbeat = Heartbeat(
        client,
        lambda: replace(INFO, free_slots=leases.free_count()),
        interval_s=0.05,
        ttl_s=0.3,
        on_beat=leases.refresh_all,
    )
    heartbeat.start()
    try:
        time.sleep(0.6)  # twice the lease ttl
        assert leases.owner_of("task-1") == lease
        info = list_hosts(client)[0].info
        assert info is not None and info.free_slots == 3
    finally:
        heartbeat.stop()
    assert wait_until(lambda: leases.free_count() == 4)


def test_start_twice_and_bad_interval(client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        Heartbeat(client, lambda: INFO, interval_s=5, ttl_s=5)
    heartbeat = Heartbeat(client, lambda: INFO, interval_s=1, ttl_s=5)
    heartbeat.start()
    try:
        with pytest.raises(RuntimeError):
            heartbeat.start()
    finally:
        heartbeat.stop()
