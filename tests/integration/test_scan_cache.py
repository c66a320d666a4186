"""Partition and blkid scans through the cache, on real attached images."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.errors import ReadOnlyError, VMCraftError
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.toolkit import copy_image, sha256_file


@pytest.fixture
def ran():
    """Programs actually run during the test, in order."""
    seen: list[str] = []
    remove = commands.add_observer(lambda argv: seen.append(argv[0]))
    yield seen
    remove()


def test_list_partitions_hits_the_cache_after_the_first_call(linux_gpt_raw, ran):
    with VMCraft(linux_gpt_raw.path, cache=InProcessTTLCache()) as g:
        first = g.list_partitions()
        for _ in range(4):
            assert g.list_partitions() == first
        assert ran.count("sfdisk") == 1
        assert g.cache_stats()["partitions_hits"] == 4
        g.list_partitions(use_cache=False)
        assert ran.count("sfdisk") == 2


def test_blkid_hits_the_cache_and_merges_the_partition_table(linux_gpt_raw, ran):
    with VMCraft(linux_gpt_raw.path, cache=InProcessTTLCache()) as g:
        dev = g.device(4)
        tags = g.blkid(dev)
        for _ in range(9):
            assert g.blkid(dev) == tags
        assert ran.count("blkid") == 1
        assert tags["TYPE"] == "xfs"
        assert tags["UUID"] == linux_gpt_raw.notes["fs_uuids"][4]
        assert tags["LABEL"] == "var"
        assert tags["PARTUUID"] == linux_gpt_raw.notes["partuuids"][4]
        assert "DEVNAME" not in tags
        assert g.cache_stats()["blkid_hits"] == 9
        g.blkid(dev, use_cache=False)
        assert ran.count("blkid") == 2


def test_a_second_attach_of_the_same_image_is_served_from_the_cache(linux_gpt_raw, ran):
    cache = InProcessTTLCache()
    with VMCraft(linux_gpt_raw.path, cache=cache) as g:
        g.filesystems()
    runs = (ran.count("sfdisk"), ran.count("blkid"))
    with VMCraft(linux_gpt_raw.path, cache=cache) as g:
        fs = g.filesystems()
    assert (ran.count("sfdisk"), ran.count("blkid")) == runs
    assert {f.partition: f.uuid for f in fs} == linux_gpt_raw.notes["fs_uuids"]


def test_ttl_is_a_public_setting(linux_gpt_raw, ran):
    with VMCraft(linux_gpt_raw.path, cache=InProcessTTLCache()) as g:
        g.blkid_cache_ttl = 0
        g.partition_cache_ttl = 0
        assert g.cache_ttl.blkid_s == 0
        g.blkid(2)
        g.blkid(2)
        assert ran.count("blkid") == 2


def test_invalidate_one_partition_or_the_whole_disk(linux_gpt_raw, ran):
    with VMCraft(linux_gpt_raw.path, cache=InProcessTTLCache()) as g:
        g.blkid(2)
        g.blkid(3)
        g.invalidate_partition_cache(g.device(2))
        g.blkid(2)
        g.blkid(3)
        assert ran.count("blkid") == 3
        g.invalidate_partition_cache()
        g.list_partitions()
        g.blkid(3)
        assert ran.count("sfdisk") == 2
        assert ran.count("blkid") == 4


def test_unknown_device_is_refused(linux_gpt_raw):
    with (
        VMCraft(linux_gpt_raw.path) as g,
        pytest.raises(VMCraftError, match="not a device of this disk"),
    ):
        g.blkid("/dev/sda1")


def test_mbr_logical_partitions_are_listed_without_the_extended_container(mbr_logical_raw):
    with VMCraft(mbr_logical_raw.path) as g:
        parts = g.list_partitions()
        assert [p.number for p in parts] == [1, 5, 6, 7]
        assert [p.number for p in parts if p.logical] == [5, 6, 7]
        assert {p.number: p.uuid for p in parts} == {
            n: u for n, u in mbr_logical_raw.notes["partuuids"].items() if n != 2
        }
        assert {fs.partition: fs.label for fs in g.filesystems()} == mbr_logical_raw.notes["labels"]


def test_partition_edits_need_write_mode(linux_gpt_raw):
    with VMCraft(linux_gpt_raw.path) as g, pytest.raises(ReadOnlyError, match="needs write mode"):
        g.part_add(g.disk_device, "primary", 2048, -1)


def test_part_add_and_part_del_invalidate_both_caches(twenty_parts_raw, tmp_path, ran):
    """Write mode on a copy we own: the table changes and the next scan sees it."""
    image = copy_image(twenty_parts_raw, tmp_path)
    source_sum = sha256_file(twenty_parts_raw.path)
    with VMCraft(image, readonly=False, cache=InProcessTTLCache()) as g:
        before = g.list_partitions()
        assert g.blkid(20)["LABEL"] == "p20"
        g.list_partitions()
        assert ran.count("sfdisk") == 1
        last = before[-1]
        g.part_del(g.disk_device, 20)
        assert [p.number for p in g.list_partitions()] == list(range(1, 20))
        assert ran.count("sfdisk") == 3  # the edit, then a fresh scan
        g.part_add(g.disk_device, "primary", last.start_sector, last.start_sector + 2047)
        after = g.list_partitions()
        assert ran.count("sfdisk") == 5
        assert [p.number for p in after] == list(range(1, 21))
        assert (after[-1].start_sector, after[-1].size_sectors) == (last.start_sector, 2048)
        assert after[-1].uuid != last.uuid  # a new GPT entry, not a cached one
        assert g.blkid(20)["LABEL"] == "p20"  # the filesystem is still at that offset
        assert ran.count("blkid") == 2
    assert sha256_file(twenty_parts_raw.path) == source_sum
    with VMCraft(image) as g:
        assert g.list_partitions()[-1].size_sectors == 2048


def test_part_init_writes_an_empty_table(mbr_logical_raw, tmp_path):
    image = copy_image(mbr_logical_raw, tmp_path)
    with VMCraft(image, readonly=False) as g:
        g.part_init(g.disk_device, "gpt")
        assert g.list_partitions() == []
        g.part_add(g.disk_device, "p", 2048, 4095)
        parts = g.list_partitions()
        assert [(p.number, p.table, p.start_sector) for p in parts] == [(1, "gpt", 2048)]
