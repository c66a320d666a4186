from vmcraft_tasks.craft.cache import (
    KIND_BLKID,
    KIND_PARTITIONS,
    CacheTTL,
    InProcessTTLCache,
    NullCache,
    cache_key,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hit_then_expiry_counts_hits_and_misses():
    clock = FakeClock()
    cache = InProcessTTLCache(clock=clock)
    key = cache_key("disk-a", 0, KIND_BLKID, "p1")
    assert cache.get(key, KIND_BLKID) is None
    cache.set(key, {"TYPE": "ext4"}, ttl_s=120)
    assert cache.get(key, KIND_BLKID) == {"TYPE": "ext4"}
    clock.now += 121
    assert cache.get(key, KIND_BLKID) is None
    assert cache.stats() == {"blkid_misses": 2, "blkid_hits": 1}


def test_caller_cannot_mutate_cached_value():
    cache = InProcessTTLCache()
    key = cache_key("disk-a", 0, KIND_PARTITIONS)
    cache.set(key, [{"number": 1}], ttl_s=60)
    got = cache.get(key, KIND_PARTITIONS)
    assert got is not None
    got[0]["number"] = 99
    assert cache.get(key, KIND_PARTITIONS) == [{"number": 1}]


def test_generation_bump_makes_old_keys_unreachable_for_that_disk_only():
    cache = InProcessTTLCache()
    old_a = cache_key("disk-a", cache.generation("disk-a"), KIND_PARTITIONS)
    b = cache_key("disk-b", cache.generation("disk-b"), KIND_PARTITIONS)
    cache.set(old_a, ["a"], 60)
    cache.set(b, ["b"], 60)
    assert cache.bump_generation("disk-a") == 1
    new_a = cache_key("disk-a", cache.generation("disk-a"), KIND_PARTITIONS)
    assert new_a != old_a
    assert cache.get(new_a, KIND_PARTITIONS) is None
    assert cache.get(old_a, KIND_PARTITIONS) is None
    assert cache.get(b, KIND_PARTITIONS) == ["b"]


def test_keys_never_contain_device_paths():
    key = cache_key("3f2a", 4, KIND_BLKID, "p2")
    assert "/dev" not in key and key == "3f2a:g4:blkid:p2"


def test_zero_ttl_disables_storing():
    cache = InProcessTTLCache()
    cache.set("k", 1, ttl_s=0)
    assert cache.get("k", KIND_BLKID) is None


def test_null_cache_always_misses():
    cache = NullCache()
    cache.set("k", 1, 60)
    assert cache.get("k", KIND_PARTITIONS) is None
    assert cache.stats() == {"partitions_misses": 1}


def test_ttl_defaults_follow_the_guide():
    ttl = CacheTTL()
    assert (ttl.for_kind(KIND_PARTITIONS), ttl.for_kind(KIND_BLKID)) == (60.0, 120.0)
