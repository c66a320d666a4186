"""Against a real Redis: the scripts and MULTIs as the stores call them stay in one
cluster slot, every key a batch or a VM creates expires, per-host places of a batch,
and the batches index is trimmed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.crc import key_slot

from vmcraft_tasks import keys, luascripts
from vmcraft_tasks.batches import BATCH_TTL_S, BatchStore
from vmcraft_tasks.jobs import JOB_TTL_S, JobStore
from vmcraft_tasks.rediscache import RedisScanCache
from worker import procs
from worker.broker import UNACKED, UNACKED_INDEX, Broker, Message
from worker.leases import SlotLeases
from worker.registry import HostInfo, publish_heartbeat
from worker.semaphore import RedisSemaphore
from worker.steps import Holder
from worker.timeline import record_interval

HOST = "conv-01"
BATCH = "wave-1"


def _plan(n: int = 3) -> dict[str, Any]:
    return {"batch": BATCH, "vms": [{"id": f"vm{i}", "priority": 0} for i in range(n)]}


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


class Recorder:
    """Every script call (by name, with its KEYS) and every MULTI (the keys it names)."""

    def __init__(self) -> None:
        self.by_source = {luascripts.load(n): n for n in luascripts.names()}
        self.scripts: list[tuple[str, list[str]]] = []
        self.transactions: list[list[str]] = []


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    call, execute = Script.__call__, Pipeline.execute

    def recording_call(self: Script, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        source = self.script if isinstance(self.script, str) else bytes(self.script).decode()
        rec.scripts.append((rec.by_source.get(source, "?"), [str(k) for k in keys or []]))
        return call(self, keys=keys, args=args, client=client)

    def recording_execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        if vars(self).get("transaction") and self.command_stack:
            rec.transactions.append([str(args[1]) for args, _ in self.command_stack])
        return execute(self, raise_on_error=raise_on_error)

    monkeypatch.setattr(Script, "__call__", recording_call)
    monkeypatch.setattr(Pipeline, "execute", recording_execute)
    return rec


def _one_slot(names: list[str]) -> bool:
    return len({key_slot(k.encode()) for k in names}) == 1


def _holder() -> Holder:
    return Holder(HOST, os.getpid(), procs.start_ticks(os.getpid()), "t1", "wave-1.vm0", "scan")


def _run_a_batch(client: redis.Redis, tmp_path: Path) -> None:
    """What a batch and its VMs do to Redis, through the fleet's own stores."""
    store, jobs = BatchStore(client), JobStore(client)
    store.create(BATCH, _plan(), max_parallel=2)
    for i in range(3):
        jobs.create(f"{BATCH}.vm{i}", "/img", batch=BATCH)
    first = store.claim_next(BATCH)
    second = store.claim_next(BATCH)
    assert (first, second) == ("vm0", "vm1")
    assert store.claim_next(BATCH) is None  # max_parallel
    assert store.next_attempt(BATCH, "vm0") == 1
    assert store.attempts(BATCH, "vm0") == 1
    assert store.take_host_place(BATCH, HOST, "vm0", 1)
    assert not store.take_host_place(BATCH, HOST, "vm1", 1)
    jobs.transition(f"{BATCH}.vm0", "converting", host=HOST)
    jobs.set_progress(f"{BATCH}.vm0", convert_pct=50.0)
    jobs.bump_progress(f"{BATCH}.vm0", "mounted")
    jobs.record_step(f"{BATCH}.vm0", "vmcraft.vm.convert", HOST, "t-1", "ok")
    jobs.record_step(f"{BATCH}.vm1", "vmcraft.vm.convert", HOST, "t-2", "failed")
    jobs.fail(f"{BATCH}.vm1", "it broke")
    assert store.mark_ended(BATCH, "vm1")
    store.set_meta(BATCH, submitted=time.time())
    store.drop_vm(BATCH, "vm2")
    store.requeue(BATCH, ["vm2"])
    assert store.counts(BATCH).total == 3
    _run_a_host(client, tmp_path)


def _run_a_host(client: redis.Redis, tmp_path: Path) -> None:
    """What a host does to Redis for its VMs: leases, places, cache, registry, broker."""
    leases = SlotLeases(client, HOST, slots=2, ttl_s=30, work_dir=str(tmp_path / "work"))
    lease = leases.acquire("t-1")
    assert lease is not None
    leases.refresh_all()
    leases.refresh_all({"t-1"})
    leases.acquire("t-2")
    leases.release("t-2")
    sem = RedisSemaphore(client, keys.semaphore_key(HOST, "mounts"), limit=2, ttl_s=30)
    assert sem.try_acquire("a", _holder())
    assert sem.try_acquire("b")
    assert sem.refresh("a")
    assert set(sem.holders_detail()) == {"a", "b"}
    assert not sem.evict("a", Holder(HOST, 1, 1, "other", "j", "scan"))
    assert sem.release("b")

    cache = RedisScanCache(client)
    cache.set("disk-a:g0:blkid:p1", {"TYPE": "ext4"}, 60)
    assert cache.get("disk-a:g0:blkid:p1", "blkid") == {"TYPE": "ext4"}
    cache.bump_generation("disk-a")
    assert cache.generation("disk-a") == 1
    assert cache.stats() == {"blkid_hits": 1}

    info = HostInfo(HOST, "fuse", {"max_attached": 2}, 2, ("/img",), (os.getpid(),), 0.0)
    publish_heartbeat(client, info, ttl_s=30)
    record_interval(client, HOST, "mount", 1.0, 2.0, "vm0")
    client.set(keys.host_tasks_key(HOST), json.dumps({"tasks": []}), px=30_000)

    entry = json.dumps([{"headers": {"task": "vmcraft.vm.scan", "id": "x"}}, "", "vmcraft.intake"])
    client.hset(UNACKED, "tag-1", entry)
    client.zadd(UNACKED_INDEX, {"tag-1": 1.0})
    taken = Message("x", 0, "vmcraft.vm.scan", None, "vmcraft.intake", "tag-1", 1.0, entry)
    assert Broker(client).drop(taken)


def test_scripts_and_transactions_stay_in_one_slot(
    client: redis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    _run_a_batch(client, tmp_path)
    called = {name for name, _ in recorder.scripts}
    assert called == set(luascripts.names())  # every script ran at least once
    for name, script_keys in recorder.scripts:
        if name == "broker_move":  # kombu's own keys: see tests/unit/test_keys.py
            assert script_keys == [UNACKED, UNACKED_INDEX, "vmcraft.intake"]
            continue
        assert script_keys and _one_slot(script_keys), (name, script_keys)
    assert recorder.transactions
    for names in recorder.transactions:
        assert _one_slot(names), names


def test_every_key_a_batch_or_vm_creates_expires(client: redis.Redis, tmp_path: Path) -> None:
    _run_a_batch(client, tmp_path)
    found = sorted(client.scan_iter(match=f"{keys.PREFIX}*"))
    persistent = set(keys.PERSISTENT)
    # Everything the run made is there to check (a key that vanished proves nothing).
    for key in [
        *(k for k in keys.batch_keys(BATCH) if k != keys.batch_inflight_key(BATCH)),
        keys.batch_inflight_key(BATCH),
        keys.batch_host_key(BATCH, HOST),
        keys.job_key(f"{BATCH}.vm0"),
        keys.job_steps_key(f"{BATCH}.vm0"),
        keys.slot_key(HOST, 0),
        keys.semaphore_key(HOST, "mounts"),
        keys.host_key(HOST),
        keys.events_key(HOST, "mount"),
    ]:
        assert key in found, key
    for key in found:
        if key in persistent:
            continue
        assert client.pttl(key) > 0, f"{key} has no TTL"
    assert set(found) - {k for k in found if client.pttl(k) > 0} <= persistent
    # Batch keys live for the batch TTL, job keys for the job TTL.
    assert BATCH_TTL_S - 60 < client.ttl(keys.batch_ended_key(BATCH)) <= BATCH_TTL_S
    assert BATCH_TTL_S - 60 < client.ttl(keys.batch_attempts_key(BATCH)) <= BATCH_TTL_S
    assert JOB_TTL_S - 60 < client.ttl(keys.job_steps_key(f"{BATCH}.vm1")) <= JOB_TTL_S


def test_writes_refresh_the_ttl(client: redis.Redis) -> None:
    store, jobs = BatchStore(client), JobStore(client)
    store.create(BATCH, _plan(), max_parallel=0)
    jobs.create("j1", "/img")
    assert store.claim_next(BATCH) == "vm0"
    for key in [*keys.batch_keys(BATCH), keys.job_key("j1")]:
        client.expire(key, 100)
    assert store.mark_ended(BATCH, "vm0")  # one write to the batch refreshes all its keys
    for key in keys.batch_keys(BATCH):
        if client.exists(key):
            assert client.ttl(key) > BATCH_TTL_S - 60, key
    assert jobs.set_progress("j1", pct=1)
    assert client.ttl(keys.job_key("j1")) > JOB_TTL_S - 60
    client.expire(keys.job_key("j1"), 100)
    assert jobs.bump_progress("j1", "n") == 1
    assert client.ttl(keys.job_key("j1")) > JOB_TTL_S - 60


def test_host_places_of_a_batch(client: redis.Redis) -> None:
    store = BatchStore(client)
    store.create(BATCH, _plan(), max_parallel=0)
    assert store.take_host_place(BATCH, HOST, "vm0", 2)
    assert store.take_host_place(BATCH, HOST, "vm0", 2)  # already holds: not a second place
    assert store.take_host_place(BATCH, HOST, "vm1", 2)
    assert not store.take_host_place(BATCH, HOST, "vm2", 2)
    assert store.take_host_place(BATCH, "conv-02", "vm2", 2)  # another host: its own places
    assert store.take_host_place(BATCH, HOST, "vm1", 1)  # holds one, even over a lower limit
    assert store.host_places(BATCH, HOST) == {"vm0", "vm1"}
    assert store.release_host_place(BATCH, HOST, "vm0")
    assert not store.release_host_place(BATCH, HOST, "vm0")
    assert store.take_host_place(BATCH, HOST, "vm2", 2)
    with pytest.raises(ValueError):
        store.take_host_place(BATCH, HOST, "vm2", -1)
    for vm in ("vm3", "vm4", "vm5"):  # 0: unlimited
        assert store.take_host_place("other", HOST, vm, 0)
    assert store.host_places("other", HOST) == {"vm3", "vm4", "vm5"}
    # A new batch of the same name starts without the old one's places.
    store.create(BATCH, _plan(), max_parallel=0)
    assert store.host_places(BATCH, HOST) == set()
    assert store.host_places(BATCH, "conv-02") == set()
    assert not client.exists(keys.batch_hosts_key(BATCH))


def test_creating_a_batch_trims_the_index(client: redis.Redis) -> None:
    store = BatchStore(client)
    client.zadd(keys.batches_index(), {"ancient": time.time() - BATCH_TTL_S - 10})
    client.zadd(keys.batches_index(), {"recent": time.time() - BATCH_TTL_S + 3600})
    store.create(BATCH, _plan(1), max_parallel=0)
    assert store.batches() == ["recent", BATCH]
    assert client.ttl(keys.batches_index()) == -1  # fleet-wide: listed in keys.PERSISTENT
    assert keys.batches_index() in keys.PERSISTENT


def test_a_new_batch_keeps_counting_attempts(client: redis.Redis) -> None:
    """Task ids stay unique when a batch of the same name is submitted again."""
    store = BatchStore(client)
    store.create(BATCH, _plan(1), max_parallel=0)
    assert store.next_attempt(BATCH, "vm0") == 1
    store.create(BATCH, _plan(1), max_parallel=0)
    assert store.next_attempt(BATCH, "vm0") == 2
    assert store.attempts(BATCH, "vm9") is None


def test_broker_skips_values_that_are_not_text(client: redis.Redis, redis_url: str) -> None:
    """Anyone who reaches the broker can push bytes; the fleet's clients decode replies,
    and the broker view must still read everything else."""
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.rpush("vmcraft.intake", b"\xff\xfe not utf-8")
        good = {"headers": {"task": "vmcraft.vm.scan", "id": "ok-1"}, "body": ""}
        raw.rpush("vmcraft.intake", json.dumps(good))
        raw.hset(UNACKED, b"\xff", b"\xff")
        raw.hset(UNACKED, "tag-2", b"\xfe\xff")
        entry = json.dumps([good, "", "vmcraft.intake"])
        raw.hset(UNACKED, "tag-3", entry)
        raw.zadd(UNACKED_INDEX, {b"\xff": 1.0})
        raw.zadd(UNACKED_INDEX, {"tag-3": 2.0})
    finally:
        raw.close()
    broker = Broker(client)
    queued, complete = broker.queued(["vmcraft.intake"])
    assert [m.task_id for m in queued] == ["ok-1"] and complete
    unacked = broker.unacked()
    assert [(m.tag, m.delivered_at) for m in unacked] == [("tag-3", 2.0)]
    assert broker.restore(unacked[0])
    assert not client.hexists(UNACKED, "tag-3")
