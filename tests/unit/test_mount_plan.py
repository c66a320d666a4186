from collections.abc import Sequence

import pytest

from vmcraft_tasks.craft.mount.parallel import mount_waves, nearest_parent
from vmcraft_tasks.craft.mount.plan import (
    STRATEGY_NOLOAD,
    STRATEGY_NORECOVERY,
    STRATEGY_NORMAL,
    STRATEGY_NTFS_FORCE,
    MountStrategy,
    default_options,
    parse_modules_list,
    parse_proc_filesystems,
    plan_strategies,
)
from vmcraft_tasks.craft.mount.tracker import unmount_order

HOST_WITHOUT_VFAT_NTFS3 = {"ext4", "ext3", "ext2", "xfs", "btrfs", "fuseblk", "fuse"}
HOST_WITH_ALL = HOST_WITHOUT_VFAT_NTFS3 | {"vfat", "ntfs3"}


def names(strategies: Sequence[MountStrategy]) -> list[str]:
    return [s.name for s in strategies]


def test_ext_ladder_is_normal_then_noload_with_safety_options():
    plan = plan_strategies("ext4", readonly=True, kernel_filesystems=HOST_WITH_ALL)
    assert names(plan) == [STRATEGY_NORMAL, STRATEGY_NOLOAD]
    assert plan[0].options == ("ro", "nosuid", "nodev", "noexec")
    assert plan[1].options[:2] == ("ro", "noload")
    assert plan[1].skips_journal and not plan[0].skips_journal


def test_xfs_never_gets_noload_and_always_nouuid_when_read_only():
    plan = plan_strategies("xfs", readonly=True, kernel_filesystems=HOST_WITH_ALL)
    assert names(plan) == [STRATEGY_NORMAL, STRATEGY_NORECOVERY]
    assert all("noload" not in s.options for s in plan)
    assert all("nouuid" in s.options for s in plan)


def test_write_mode_drops_noexec_but_keeps_nouuid_for_clones():
    # Converted copies of one template share an XFS UUID and are attached writable.
    plan = plan_strategies("xfs", readonly=False, kernel_filesystems=HOST_WITH_ALL)
    assert plan[0].options == ("rw", "nouuid", "nosuid", "nodev")


def test_ntfs_uses_kernel_ntfs3_with_force_rung_when_present():
    plan = plan_strategies("ntfs", readonly=True, kernel_filesystems=HOST_WITH_ALL)
    assert names(plan) == [STRATEGY_NORMAL, STRATEGY_NTFS_FORCE]
    assert plan[0].driver == "kernel" and plan[0].fstype == "ntfs3"
    assert "force" in plan[1].options


def test_ntfs_falls_back_to_ntfs3g_fuse_read_only_without_kernel_driver():
    plan = plan_strategies("ntfs", readonly=False, kernel_filesystems=HOST_WITHOUT_VFAT_NTFS3)
    assert {s.driver for s in plan} == {"fuse"}
    assert all(s.program == "ntfs-3g" and s.options[0] == "ro" for s in plan)
    assert plan[0].argv("/dev/loop3", "/mnt/c") == [
        "ntfs-3g",
        "-o",
        "ro,nosuid,nodev",
        "/dev/loop3",
        "/mnt/c",
    ]


def test_vfat_kernel_gets_utf8_and_fuse_fallback_is_fusefat():
    kernel = plan_strategies("vfat", readonly=True, kernel_filesystems=HOST_WITH_ALL)
    assert "utf8" in kernel[0].options and kernel[0].driver == "kernel"
    fuse = plan_strategies("vfat", readonly=True, kernel_filesystems=HOST_WITHOUT_VFAT_NTFS3)
    assert fuse[0].program == "fusefat" and fuse[0].driver == "fuse"


def test_unknown_filesystem_gets_the_whole_ladder_without_type():
    plan = plan_strategies(None, readonly=True, kernel_filesystems=HOST_WITH_ALL)
    assert names(plan) == [STRATEGY_NORMAL, STRATEGY_NORECOVERY, STRATEGY_NOLOAD]
    assert plan[0].argv("/dev/loop1", "/m")[:3] == ["mount", "-o", "ro,nosuid,nodev,noexec"]


@pytest.mark.parametrize("fstype", ["swap", "crypto_LUKS", "LVM2_member"])
def test_unmountable_types_have_no_rungs(fstype):
    assert plan_strategies(fstype, readonly=True, kernel_filesystems=HOST_WITH_ALL) == []


def test_default_options_per_filesystem():
    assert default_options("ext4", True) == ("ro", "noload", "nosuid", "nodev", "noexec")
    assert default_options("xfs", True)[:3] == ("ro", "norecovery", "nouuid")
    assert default_options("btrfs", True)[:2] == ("ro", "rescue=nologreplay")
    assert default_options("vfat", False) == ("rw", "utf8", "nosuid", "nodev")


def test_parse_proc_filesystems_and_modules():
    text = "nodev\tsysfs\n\text4\nnodev\tfuse\n\txfs\n"
    assert parse_proc_filesystems(text) == {"sysfs", "ext4", "fuse", "xfs"}
    mods = (
        "kernel/fs/ntfs3/ntfs3.ko.xz: kernel/lib/x.ko\n"
        "kernel/drivers/block/nbd.ko:\n"
        "kernel/fs/fat/vfat.ko:\n"
    )
    assert parse_modules_list(mods) == {"ntfs3", "vfat"}


def test_waves_put_parents_before_children():
    waves = mount_waves(["/g/boot/efi", "/g/var/log", "/g", "/g/boot", "/g/var", "/g/home"])
    assert waves == [["/g"], ["/g/boot", "/g/var", "/g/home"], ["/g/boot/efi", "/g/var/log"]]


def test_waves_of_unrelated_mountpoints_are_one_wave():
    assert mount_waves(["/m/p1", "/m/p2", "/m/p10"]) == [["/m/p1", "/m/p2", "/m/p10"]]


def test_prefix_is_not_a_parent():
    assert nearest_parent("/m/p10", ["/m/p1"]) is None
    assert nearest_parent("/m/p1/x", ["/m/p1", "/m"]) == "/m/p1"


def test_duplicate_mountpoint_is_rejected():
    with pytest.raises(ValueError, match="requested twice"):
        mount_waves(["/m/a", "/m/a/"])


def test_unmount_order_is_deepest_first():
    assert unmount_order(["/g", "/g/boot/efi", "/g/boot", "/h"]) == [
        "/g/boot/efi",
        "/g/boot",
        "/h",
        "/g",
    ]
