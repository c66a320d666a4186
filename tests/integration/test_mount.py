"""Mounting real filesystems: defaults, the fallback ladder, parallel mounts, FUSE drivers."""

from __future__ import annotations

import os

import pytest

from vmcraft_tasks.craft.errors import MountError
from vmcraft_tasks.craft.mount.plan import (
    STRATEGY_NOLOAD,
    STRATEGY_NORECOVERY,
    STRATEGY_NORMAL,
)
from vmcraft_tasks.craft.nbd.helpers import process_alive
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.toolkit import sha256_file


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def mount_options(mountpoint: str) -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == mountpoint:
                # Per-mount options, then the filesystem's own (after the " - " separator).
                return set(fields[5].split(",")) | set(fields[-1].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_guest_tree_mounts_parents_before_children(linux_gpt_raw, tmp_path):
    notes = linux_gpt_raw.notes
    root = str(tmp_path / "guest")
    with VMCraft(linux_gpt_raw.path) as g:
        # Children listed first on purpose: the waves must still mount / first.
        pairs = [
            (g.device(n), root + mp) if mp != "/" else (g.device(n), root)
            for n, mp in sorted(notes["mountpoints"].items(), key=lambda kv: -len(kv[1]))
            if mp.startswith("/")
        ]
        results = g.mount_all_parallel(pairs, max_workers=4)
        assert all(results.values()), results
        for guest_path, text in notes["guest_files"].items():
            assert read(root + guest_path) == text, guest_path
        assert {"nosuid", "nodev", "noexec", "ro"} <= mount_options(root + "/var")
        assert g.umount_all() == []
        assert not os.path.ismount(root) and not os.path.ismount(root + "/boot/efi")


def test_one_failed_partition_is_reported_and_the_others_mount(linux_gpt_raw, tmp_path):
    with VMCraft(linux_gpt_raw.path) as g:
        pairs = [(g.device(n), str(tmp_path / f"p{n}")) for n in (2, 3, 6)]
        results = g.mount_all_parallel(pairs, max_workers=2)
        assert results[str(tmp_path / "p2")].ok and results[str(tmp_path / "p3")].ok
        swap = results[str(tmp_path / "p6")]
        assert not swap and swap.error == "swap is not a mountable filesystem"


def test_children_of_a_failed_parent_are_skipped(linux_gpt_raw, tmp_path):
    with VMCraft(linux_gpt_raw.path) as g:
        results = g.mount_all_parallel(
            [(g.device(6), str(tmp_path / "g")), (g.device(2), str(tmp_path / "g/boot"))]
        )
        assert results[str(tmp_path / "g/boot")].error == f"parent mount {tmp_path / 'g'} failed"
        assert not g.mounts()


def test_dirty_ext4_is_replayed_into_the_overlay_and_the_source_is_unchanged(
    dirty_ext4_raw, tmp_path
):
    before = sha256_file(dirty_ext4_raw.path)
    mp = str(tmp_path / "m")
    with VMCraft(dirty_ext4_raw.path) as g:
        result = g.mount_with_fallback(g.device(1), mp)
        assert result and result.strategy == STRATEGY_NORMAL
        assert result.journal_replayed and not result.stale_view
        assert "overlay" in (result.note or "")
        for path, text in dirty_ext4_raw.notes["files_only_after_replay"].items():
            assert read(mp + path) == text
    assert sha256_file(dirty_ext4_raw.path) == before


def test_ext4_with_a_broken_journal_falls_back_to_noload(broken_journal_ext4_raw, tmp_path):
    before = sha256_file(broken_journal_ext4_raw.path)
    mp = str(tmp_path / "m")
    with VMCraft(broken_journal_ext4_raw.path) as g:
        result = g.mount_with_fallback(g.device(1), mp)
        assert result.strategy == STRATEGY_NOLOAD
        assert [t["strategy"] for t in result.tried] == [STRATEGY_NORMAL, STRATEGY_NOLOAD]
        assert result.tried[0]["error"]
        assert result.stale_view and "stale pre-journal view" in (result.note or "")
        for path, text in broken_journal_ext4_raw.notes["files_before_replay"].items():
            assert read(mp + path) == text
        for path in broken_journal_ext4_raw.notes["files_lost"]:
            assert not os.path.exists(mp + path)
    assert sha256_file(broken_journal_ext4_raw.path) == before


def test_dirty_xfs_log_is_replayed_into_the_overlay(dirty_xfs_raw, tmp_path):
    before = sha256_file(dirty_xfs_raw.path)
    mp = str(tmp_path / "m")
    with VMCraft(dirty_xfs_raw.path) as g:
        result = g.mount_with_fallback(g.device(1), mp)
        assert result.strategy == STRATEGY_NORMAL and not result.stale_view
        for path, text in dirty_xfs_raw.notes["files_only_after_replay"].items():
            assert read(mp + path) == text
    assert sha256_file(dirty_xfs_raw.path) == before


def test_xfs_with_a_broken_log_falls_back_to_norecovery(broken_log_xfs_raw, tmp_path):
    before = sha256_file(broken_log_xfs_raw.path)
    mp = str(tmp_path / "m")
    with VMCraft(broken_log_xfs_raw.path) as g:
        result = g.mount_with_fallback(g.device(1), mp)
        assert result.strategy == STRATEGY_NORECOVERY
        assert "norecovery" in mount_options(mp)
        assert result.stale_view
        for path, text in broken_log_xfs_raw.notes["files_before_replay"].items():
            assert read(mp + path) == text
    assert sha256_file(broken_log_xfs_raw.path) == before


def test_plain_mount_uses_per_filesystem_defaults_and_raises_on_failure(
    broken_log_xfs_raw, tmp_path
):
    with VMCraft(broken_log_xfs_raw.path) as g:
        # No ladder: log recovery fails and the caller hears about it.
        with pytest.raises(MountError, match=f"mount {g.device(1)} on {tmp_path / 'b'}"):
            g.mount(g.device(1), str(tmp_path / "b"), options="ro,noexec")
        g.mount(g.device(1), str(tmp_path / "a"))
        assert {"ro", "norecovery", "nouuid", "nosuid", "nodev", "noexec"} <= mount_options(
            str(tmp_path / "a")
        )


def test_vfat_and_ntfs_fall_back_to_fuse_drivers_read_only(
    linux_gpt_raw, windows_ntfs_raw, tmp_path, open_disk
):
    linux = VMCraft(linux_gpt_raw.path).launch()
    open_disk.append(linux)
    windows = VMCraft(windows_ntfs_raw.path).launch()
    open_disk.append(windows)
    esp = linux.mount_with_fallback(linux.device(1), str(tmp_path / "esp"))
    ntfs = windows.mount_with_fallback(windows.device(1), str(tmp_path / "c"))
    for result, program in ((esp, "fusefat"), (ntfs, "ntfs-3g")):
        assert result and result.driver == "fuse"
        assert f"mounted read-only with {program} (FUSE)" in (result.note or "")
        assert "ro" in mount_options(result.mountpoint)
    assert (
        read(str(tmp_path / "esp/EFI/debian/grubx64.efi"))
        == linux_gpt_raw.notes["files"][1]["/EFI/debian/grubx64.efi"]
    )
    assert os.path.isfile(str(tmp_path / "c/Windows/System32/cmd.exe"))


def test_xfs_clones_mount_side_by_side(linux_gpt_raw, linux_gpt_qcow2, tmp_path, open_disk):
    """Two disks with the same XFS UUID (one template, two formats) on one host."""
    a = VMCraft(linux_gpt_raw.path).launch()
    open_disk.append(a)
    b = VMCraft(linux_gpt_qcow2.path).launch()
    open_disk.append(b)
    ra = a.mount_with_fallback(a.device(4), str(tmp_path / "a"))
    rb = b.mount_with_fallback(b.device(4), str(tmp_path / "b"))
    assert ra and rb, (ra.error, rb.error)
    assert "nouuid" in rb.options
    assert a.blkid(4)["UUID"] == b.blkid(4)["UUID"]


def test_umount_all_unmounts_deepest_first_and_shutdown_cleans_up(linux_gpt_raw, tmp_path):
    g = VMCraft(linux_gpt_raw.path).launch()
    helper_pids = list(g.disk.helper_pids)
    root = str(tmp_path / "g")
    g.mount_all_parallel([(3, root), (2, root + "/boot"), (1, root + "/boot/efi")])
    assert len(g.mounts()) == 3
    g.shutdown()  # unmounts too
    assert not os.path.ismount(root)
    assert not any(process_alive(pid) for pid in helper_pids)


def test_mount_all_parallel_accepts_partition_numbers(twenty_parts_raw, tmp_path):
    with VMCraft(twenty_parts_raw.path) as g:
        pairs = [(n, str(tmp_path / f"p{n:02d}")) for n in range(1, 21)]
        results = g.mount_all_parallel(pairs, max_workers=8)
        assert sum(1 for r in results.values() if r) == 20
        for n in range(1, 21):
            assert read(str(tmp_path / f"p{n:02d}/id.txt")) == f"{n}\n"
