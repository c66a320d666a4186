"""RedisScanCache against a real redis-server: values, TTLs, generations, counters, processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from vmcraft_tasks import keys
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import KIND_BLKID, KIND_PARTITIONS, cache_key
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.embedded.redis import free_port
from vmcraft_tasks.rediscache import CacheUnavailableError, RedisScanCache

PROJECT = Path(__file__).resolve().parents[2]
NS = keys.CACHE_NAMESPACE
VALUE = {"TYPE": "ext4", "UUID": "0b0e", "parts": [1, 2, {"n": None, "ok": True}], "f": 1.5}


@pytest.fixture
def cache(redis_url: str) -> Iterator[RedisScanCache]:
    c = RedisScanCache.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def run_python(code: str, *args: str) -> Any:
    """Run `code` in a fresh interpreter; it prints one JSON document, returned decoded."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_values_round_trip_as_json(cache, raw):
    key = cache_key("disk-a", 0, KIND_BLKID, "p1")
    cache.set(key, VALUE, 60)
    assert cache.get(key, KIND_BLKID) == VALUE
    assert json.loads(raw.get(f"{NS}:{key}")) == VALUE
    assert cache.get(cache_key("disk-a", 0, KIND_BLKID, "p2"), KIND_BLKID) is None


def test_callers_get_their_own_copy(cache):
    cache.set("k", VALUE, 60)
    first = cache.get("k", KIND_BLKID)
    first["parts"].append(99)
    assert cache.get("k", KIND_BLKID) == VALUE


def test_ttl_is_set_in_milliseconds_and_expires(cache, raw):
    cache.set("short", VALUE, 0.2)
    assert 0 < raw.pttl(f"{NS}:short") <= 200
    assert cache.get("short", KIND_BLKID) == VALUE
    time.sleep(0.3)
    assert cache.get("short", KIND_BLKID) is None


@pytest.mark.parametrize("ttl", [0, -1, 0.0])
def test_a_ttl_of_zero_or_less_stores_nothing(cache, raw, ttl):
    cache.set("never", VALUE, ttl)
    assert cache.get("never", KIND_BLKID) is None
    assert raw.exists(f"{NS}:never") == 0


def test_a_tiny_positive_ttl_still_stores(cache, raw):
    cache.set("tiny", VALUE, 0.0001)  # rounds up to 1 ms, never PX 0
    assert raw.pttl(f"{NS}:tiny") in (-2, 0, 1)


def test_delete(cache):
    cache.set("gone", VALUE, 60)
    cache.delete("gone")
    assert cache.get("gone", KIND_BLKID) is None
    cache.delete("gone")  # deleting a missing key is fine


def test_bumping_the_generation_makes_old_keys_unreachable(cache, raw):
    assert cache.generation("disk-a") == 0
    old = cache_key("disk-a", cache.generation("disk-a"), KIND_PARTITIONS)
    cache.set(old, [{"number": 1}], 60)
    other_disk = cache_key("disk-b", cache.generation("disk-b"), KIND_PARTITIONS)
    cache.set(other_disk, [{"number": 7}], 60)

    assert cache.bump_generation("disk-a") == 1
    assert cache.bump_generation("disk-a") == 2
    assert cache.generation("disk-a") == 2
    new = cache_key("disk-a", cache.generation("disk-a"), KIND_PARTITIONS)
    assert new != old
    assert cache.get(new, KIND_PARTITIONS) is None
    # Not deleted, just unreachable: it expires by its own TTL.
    assert raw.exists(f"{NS}:{old}") == 1
    # Other disks keep their generation and their entries.
    assert cache.generation("disk-b") == 0
    assert cache.get(other_disk, KIND_PARTITIONS) == [{"number": 7}]


def test_generation_keys_expire_eventually(cache, raw):
    cache.bump_generation("disk-a")
    week_ms = 7 * 24 * 3600 * 1000
    assert week_ms - 60_000 < raw.pttl(f"{NS}:gen:disk-a") <= week_ms
    raw.pexpire(f"{NS}:gen:disk-a", 5_000)
    assert cache.generation("disk-a") == 1
    assert raw.pttl(f"{NS}:gen:disk-a") > 5_000  # a read refreshes it too


def test_entries_never_outlive_their_generation_key(redis_url, raw):
    c = RedisScanCache.from_url(redis_url, generation_ttl_s=10)
    c.set("long", VALUE, 3600)
    assert 0 < raw.pttl(f"{NS}:long") <= 5_000
    c.close()


def test_hits_and_misses_are_counted_per_kind(cache, raw):
    cache.set("p", [1], 60)
    cache.set("b", {"TYPE": "xfs"}, 60)
    cache.get("p", KIND_PARTITIONS)
    cache.get("p", KIND_PARTITIONS)
    cache.get("nope", KIND_PARTITIONS)
    cache.get("b", KIND_BLKID)
    cache.get("nope", KIND_BLKID)
    cache.get("nope", KIND_BLKID)
    expected = {
        "partitions_hits": 2,
        "partitions_misses": 1,
        "blkid_hits": 1,
        "blkid_misses": 2,
    }
    assert cache.stats() == expected
    assert {k.decode(): int(v) for k, v in raw.hgetall(f"{NS}:stats").items()} == expected


def test_namespaces_do_not_share_anything(redis_url, cache):
    other = RedisScanCache.from_url(redis_url, namespace="other:v1")
    cache.set("k", VALUE, 60)
    cache.bump_generation("disk-a")
    assert other.get("k", KIND_BLKID) is None
    assert other.generation("disk-a") == 0
    assert other.stats() == {"blkid_misses": 1}
    assert cache.stats() == {}
    other.close()


def test_a_client_with_decoded_responses_works_the_same(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    c = RedisScanCache(client, namespace="decoded")
    c.set("k", VALUE, 60)
    c.bump_generation("disk-a")
    assert c.get("k", KIND_BLKID) == VALUE
    assert c.generation("disk-a") == 1
    assert c.stats() == {"blkid_hits": 1}
    client.close()


READER = """
import json, sys
from vmcraft_tasks.rediscache import RedisScanCache
c = RedisScanCache.from_url(sys.argv[1])
print(json.dumps({"value": c.get(sys.argv[2], "blkid"), "gen": c.generation("disk-a")}))
"""


def test_another_process_reads_what_this_one_wrote(cache, redis_url):
    cache.set("shared", VALUE, 60)
    cache.bump_generation("disk-a")
    got = run_python(READER, redis_url, "shared")
    assert got == {"value": VALUE, "gen": 1}
    assert cache.stats() == {"blkid_hits": 1}  # counted by the other process


OPERATIONS = {
    "get": lambda c: c.get("k", KIND_BLKID),
    "set": lambda c: c.set("k", VALUE, 60),
    "delete": lambda c: c.delete("k"),
    "generation": lambda c: c.generation("disk-a"),
    "bump_generation": lambda c: c.bump_generation("disk-a"),
    "stats": lambda c: c.stats(),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_dead_redis_raises_instead_of_missing(operation):
    url = f"redis://127.0.0.1:{free_port()}/2"
    c = RedisScanCache.from_url(url, namespace="dead:v1")
    with pytest.raises(CacheUnavailableError) as info:
        OPERATIONS[operation](c)
    err = info.value
    assert isinstance(err, VMCraftError)
    assert url in str(err)
    assert (err.url, err.namespace) == (url, "dead:v1")
    assert isinstance(err.__cause__, redis.exceptions.ConnectionError)
    c.close()


def test_passwords_stay_out_of_the_error():
    port = free_port()
    c = RedisScanCache.from_url(f"redis://worker:s3cret@127.0.0.1:{port}/0")
    with pytest.raises(CacheUnavailableError) as info:
        c.generation("disk-a")
    assert "s3cret" not in str(info.value)
    assert f"redis://worker:***@127.0.0.1:{port}/0" in str(info.value)
    c.close()


# -- the facade, on a real image ------------------------------------------------------

SCAN = """
import json, sys
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.rediscache import RedisScanCache
ran = []
commands.add_observer(lambda argv: ran.append(argv[0].rsplit("/", 1)[-1]))
with VMCraft(sys.argv[2], cache=RedisScanCache.from_url(sys.argv[1])) as g:
    fs = g.filesystems()
print(json.dumps({"ran": ran, "uuids": {str(f.partition): f.uuid for f in fs}}))
"""


@pytest.mark.integration
def test_a_scan_in_one_process_is_a_hit_in_the_next(linux_gpt_raw, redis_url):
    ran: list[str] = []
    remove = commands.add_observer(lambda argv: ran.append(argv[0].rsplit("/", 1)[-1]))
    try:
        cache = RedisScanCache.from_url(redis_url)
        with VMCraft(linux_gpt_raw.path, cache=cache) as g:
            first = {f.partition: f.uuid for f in g.filesystems()}
    finally:
        remove()
    assert ran.count("sfdisk") == 1
    assert ran.count("blkid") >= 1
    after_first = cache.stats()
    assert after_first["partitions_misses"] == 1
    assert after_first.get("partitions_hits", 0) == 0
    assert after_first["blkid_misses"] >= 1

    second = run_python(SCAN, redis_url, linux_gpt_raw.path)
    assert second["ran"].count("sfdisk") == 0, second["ran"]
    assert second["ran"].count("blkid") == 0, second["ran"]
    assert {int(n): u for n, u in second["uuids"].items()} == first
    assert first == linux_gpt_raw.notes["fs_uuids"]

    after_second = cache.stats()
    assert after_second["partitions_hits"] == 1
    assert after_second["blkid_hits"] >= 1
    # Every lookup of the second process was a hit: no miss was added.
    assert after_second["partitions_misses"] == after_first["partitions_misses"]
    assert after_second["blkid_misses"] == after_first["blkid_misses"]
    cache.close()
