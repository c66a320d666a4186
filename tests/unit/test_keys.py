"""Every Redis key under one prefix, hash tags that keep each script in one cluster slot,
and the Lua scripts shipped as files (no Redis needed: see tests/worker/test_key_expiry.py
for the scripts as the stores really call them, against a real Redis)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from vmcraft_tasks import keys, luascripts
from vmcraft_tasks.batches import BatchStore
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore

HOST = "conv-01"
BATCH = "wave-1"
JOB = "wave-1.web01"

SAMPLES: dict[str, Any] = {
    "host": HOST,
    "slot": 3,
    "name": "mounts",
    "kind": "mount",
    "batch": BATCH,
    "job_id": JOB,
    "semaphore": keys.semaphore_key(HOST, "mounts"),
    "namespace": keys.CACHE_NAMESPACE,
    "key": "disk-a:g0:blkid:p1",
    "disk_identity": "disk-a",
}


def _builders() -> dict[str, Callable[..., Any]]:
    return {
        name: fn
        for name, fn in vars(keys).items()
        if inspect.isfunction(fn)
        and fn.__module__ == keys.__name__
        and not name.startswith("_")
        and name != "cache_prefix"
    }


def _call(fn: Callable[..., Any]) -> Any:
    args = [SAMPLES[p] for p in inspect.signature(fn).parameters]
    return fn(*args)


def _slot(key: str) -> int:
    return key_slot(key.encode())


def _client() -> redis.Redis:
    # Never connects: register_script and the key builders need no server.
    return redis.Redis(host="127.0.0.1", port=1, decode_responses=True)


def test_every_key_builder_is_under_the_prefix() -> None:
    built = {name: _call(fn) for name, fn in _builders().items()}
    assert len(built) >= 20
    for name, value in built.items():
        for key in value if isinstance(value, list) else [value]:
            assert key.startswith(keys.PREFIX), (name, key)
    assert keys.PREFIX == "vmcraft:v2:"
    for key in keys.PERSISTENT:
        assert key.startswith(keys.PREFIX)


def test_keys_are_all_different() -> None:
    built = []
    for fn in _builders().values():
        value = _call(fn)
        if not isinstance(value, list):
            built.append(value)
    assert len(built) == len(set(built))


def test_batch_job_and_host_keys_carry_their_tags() -> None:
    batch_keys = [
        *keys.batch_keys(BATCH),
        keys.batch_host_key(BATCH, HOST),
        keys.batch_hosts_key(BATCH),
    ]
    assert keys.batch_pending_key(BATCH) == "vmcraft:v2:batch:{wave-1}:pending"
    assert {_slot(k) for k in batch_keys} == {_slot(BATCH)}
    assert keys.job_key(JOB) == "vmcraft:v2:job:{wave-1.web01}"
    assert keys.job_steps_key(JOB) == "vmcraft:v2:job:{wave-1.web01}:steps"
    assert {_slot(keys.job_key(JOB)), _slot(keys.job_steps_key(JOB))} == {_slot(JOB)}
    sem = keys.semaphore_key(HOST, "mounts")
    host_keys = [
        keys.slot_key(HOST, 0),
        keys.slot_key(HOST, 7),
        sem,
        keys.semaphore_holders_key(sem),
        keys.host_key(HOST),
        keys.events_key(HOST, "mount"),
        keys.host_tasks_key(HOST),
    ]
    assert {_slot(k) for k in host_keys} == {_slot(HOST)}


def test_each_script_s_keys_hash_to_one_slot() -> None:
    """The KEYS of every script, built the way the stores build them."""
    client = _client()
    leases = SlotLeases(client, HOST, slots=8, ttl_s=5)
    sem = RedisSemaphore(client, keys.semaphore_key(HOST, "mounts"), limit=2, ttl_s=5)
    store = BatchStore(client)
    ns = keys.CACHE_NAMESPACE
    calls: dict[str, list[str]] = {
        "batch_claim": store._claim_keys(BATCH),
        "batch_end": store._end_keys(BATCH),
        "batch_take_host_place": [keys.batch_host_key(BATCH, HOST), keys.batch_hosts_key(BATCH)],
        "job_transition": [keys.job_key(JOB)],
        "job_update": [keys.job_key(JOB)],
        "job_bump": [keys.job_key(JOB)],
        "lease_acquire": leases._keys,
        "lease_release": leases._keys,
        "lease_refresh": leases._keys,
        "semaphore_acquire": sem._keys,
        "semaphore_refresh": sem._keys,
        "semaphore_release": sem._keys,
        "semaphore_evict": sem._keys,
        "semaphore_holders": sem._keys,
        "cache_get_and_count": [keys.cache_entry_key(ns, "k"), keys.cache_stats_key(ns)],
        "cache_get_and_count (own namespace)": [
            keys.cache_entry_key("bench:1", "k"),
            keys.cache_stats_key("bench:1"),
        ],
    }
    # kombu's own keys (`unacked`, `unacked_index`, its queues): kombu's Redis transport
    # runs on one Redis, never a cluster, and the names are kombu's.
    exempt = {"broker_move"}
    assert {name.split(" ")[0] for name in calls} | exempt == set(luascripts.names())
    for name, script_keys in calls.items():
        assert script_keys, name
        assert len({_slot(k) for k in script_keys}) == 1, (name, script_keys)
    assert len(store._claim_keys(BATCH)) == len(keys.batch_keys(BATCH))


@pytest.mark.parametrize("bad", ["", "a:b", "a/b", "{x}", "a b", "x" * 201, "dev\n"])
def test_batch_names_and_job_ids_are_checked(bad: str) -> None:
    with pytest.raises(keys.KeyPartError) as err:
        keys.batch_meta_key(bad)
    assert err.value.what == "batch name"
    with pytest.raises(keys.KeyPartError):
        keys.job_key(bad)


@pytest.mark.parametrize("good", ["b1", ".hidden-ish", "-x", "a.b_c@d-e", "0" * 200])
def test_batch_names_of_the_manifest_are_accepted(good: str) -> None:
    assert keys.batch_meta_key(good).endswith(f"{{{good}}}:meta")


@pytest.mark.parametrize("bad", ["/dev/nbd0", "a:b", "{h}", "", ".h", "x" * 129])
def test_host_parts_are_checked_as_before(bad: str) -> None:
    with pytest.raises(keys.KeyPartError):
        keys.slot_key(bad, 0)
    with pytest.raises(keys.KeyPartError):
        keys.batch_host_key(BATCH, bad)


def test_cache_namespaces_keep_one_tag() -> None:
    assert keys.cache_entry_key(keys.CACHE_NAMESPACE, "k") == "vmcraft:v2:{cache}:k"
    assert keys.cache_prefix("bench:run:1") == "bench:run:1:{c}"
    assert keys.cache_prefix("x:{mine}:y") == "x:{mine}:y"
    for bad in ["", "a b", "{", "a{b}c{d}", "}{"]:
        with pytest.raises(keys.KeyPartError):
            keys.cache_prefix(bad)


def test_scripts_ship_as_files_and_load() -> None:
    names = luascripts.names()
    assert "batch_claim" in names and "job_transition" in names
    for name in names:
        source = luascripts.load(name)
        assert source.startswith("--"), name  # each says what its KEYS and ARGV are
        assert "KEYS" in source, name
    for bad in ["", "../keys", ".hidden", "a/b"]:
        with pytest.raises(ValueError):
            luascripts.load(bad)
    with pytest.raises(FileNotFoundError):
        luascripts.load("no_such_script")


def test_register_refuses_a_client_that_does_not_decode() -> None:
    with pytest.raises(TypeError, match="decode_responses=True"):
        luascripts.register(redis.Redis(host="127.0.0.1", port=1), "batch_end")
    script = luascripts.register(_client(), "batch_end")
    assert script.script == luascripts.load("batch_end")
