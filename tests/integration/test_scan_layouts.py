"""No partition hides another: real installer layouts whose first (or middle)
partition holds no filesystem signature are scanned, mounted and inspected whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands, probe
from vmcraft_tasks.craft.vmcraft import VMCraft

LAYOUTS = ["gpt_bios_boot_raw", "gpt_windows_raw", "mbr_empty_between_raw", "random_first_raw"]
# What the scan must say about each partition that has no filesystem.
CONTENT = {
    "gpt_bios_boot_raw": {1: "BIOS boot partition: unrecognised data, no filesystem signature"},
    "gpt_windows_raw": {2: "Microsoft reserved partition: empty (all zeros in the first 1024 KiB)"},
    "mbr_empty_between_raw": {2: "Linux: empty (all zeros in the first 1024 KiB)"},
    "random_first_raw": {1: "Linux filesystem: unrecognised data, no filesystem signature"},
}


@pytest.mark.parametrize("fixture", LAYOUTS)
def test_every_filesystem_is_found_behind_an_unidentifiable_partition(request, fixture):
    built = request.getfixturevalue(fixture)
    with VMCraft(built.path) as g:
        found = {fs.partition: fs for fs in g.filesystems(use_cache=False)}
        assert {n: fs.type for n, fs in found.items()} == built.notes["fs_types"]
        assert {n: fs.content for n, fs in found.items() if fs.type is None} == CONTENT[fixture]
        assert all(fs.content is None for fs in found.values() if fs.type)


@pytest.mark.parametrize("fixture", LAYOUTS)
def test_the_guest_is_inspected_and_every_filesystem_mounted(request, fixture):
    built = request.getfixturevalue(fixture)
    with VMCraft(built.path) as g:
        report = g.inspect()
        mountable = {n for n, t in built.notes["fs_types"].items() if t not in (None, "swap")}
        assert {n for n, m in report.mounts.items() if m.ok} == mountable
        (root,) = report.roots
        assert root.root_partition == built.notes["root_partition"]
        assert root.type == ("windows" if "windows" in fixture else "linux")


def test_windows_on_gpt_is_found_with_its_version(gpt_windows_raw):
    with VMCraft(gpt_windows_raw.path) as g:
        (root,) = g.inspect_os()
    facts = gpt_windows_raw.notes["windows"]
    assert (root.product_name, root.hostname) == (facts["product_name"], facts["hostname"])


def test_one_blkid_answers_a_disk_without_unidentifiable_partitions(linux_gpt_raw):
    with VMCraft(linux_gpt_raw.path) as g, commands.recorded() as ran:
        g.filesystems(use_cache=False)
    assert ran.count("blkid") == 1


def test_an_unidentifiable_first_partition_costs_one_more_blkid(gpt_bios_boot_raw):
    with VMCraft(gpt_bios_boot_raw.path) as g, commands.recorded() as ran:
        g.filesystems(use_cache=False)
    assert ran.count("blkid") == 2


def _files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.img"
    empty.write_bytes(bytes(4096))
    noise = tmp_path / "noise.img"
    noise.write_bytes(bytes(range(256)) * 64)
    made = {}
    for name in ("a", "b", "c"):
        path = tmp_path / f"{name}.img"
        with open(path, "wb") as fh:
            fh.truncate(8 * 1024 * 1024)
        commands.run(["mkfs.ext4", "-q", "-L", name, str(path)], timeout=60)
        made[name] = path
    return {"empty": empty, "noise": noise, **made}


@pytest.mark.parametrize(
    "order",
    [
        ["empty", "a", "b"],
        ["a", "empty", "b", "noise", "c"],
        ["empty", "noise"],
        ["a", "b", "c"],
        ["a", "b", "empty"],
        ["noise"],
    ],
)
def test_run_blkid_answers_every_device_in_any_order(tmp_path, order):
    files = _files(tmp_path)
    devices = [str(files[name]) for name in order]
    tags = probe.run_blkid(*devices)
    for name, device in zip(order, devices, strict=True):
        if name in ("empty", "noise"):
            assert tags[device] == {probe.PROBE_TAG: probe.PROBE_NOTHING}, name
        else:
            assert (tags[device]["TYPE"], tags[device]["LABEL"]) == ("ext4", name)
