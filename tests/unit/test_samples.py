"""The sample images are what their notes say they are, checked with independent tools;
the toolkit's cache and the registry behave."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks import samples
from vmcraft_tasks.craft import commands
from vmcraft_tasks.samples import toolkit
from vmcraft_tasks.samples.recipes import linux_gpt
from vmcraft_tasks.samples.toolkit import BuiltImage

pytestmark = pytest.mark.integration


def _sfdisk(path: str) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(commands.run(["sfdisk", "-J", path]).stdout)[
        "partitiontable"
    ]
    return table


def _numbers(table: dict[str, Any]) -> list[int]:
    return [int(p["node"][len(table["device"]) :]) for p in table["partitions"]]


def _qemu_info(path: str, fmt: str | None = None) -> commands.CommandResult:
    argv = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    return commands.run([*argv, path], check=False)


def _blkid_at(path: str, offset: int) -> dict[str, str]:
    out = commands.run(["blkid", "-p", "-o", "export", "-O", str(offset), path]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _assert_filesystems_match(image: BuiltImage) -> None:
    for number, part in image.notes["partitions"].items():
        if "fstype" not in part:
            continue  # the MBR extended container
        tags = _blkid_at(image.path, part["start"])
        assert tags["TYPE"] == part["fstype"], number
        assert tags["UUID"] == part["uuid"], number
        assert tags["LABEL"] == part["label"], number


@contextmanager
def _loop_ro(path: str, offset: int, size: int) -> Iterator[str]:
    argv = ["losetup", "--show", "-f", "-r", "-o", str(offset), "--sizelimit", str(size), path]
    dev = commands.run(argv).stdout.strip()
    try:
        yield dev
    finally:
        commands.run(["losetup", "-d", dev])


def test_linux_gpt_raw_layout(linux_gpt_raw: BuiltImage) -> None:
    notes = linux_gpt_raw.notes
    table = _sfdisk(linux_gpt_raw.path)
    assert table["label"] == "gpt"
    assert table["id"].lower() == notes["disk_guid"]
    assert _numbers(table) == [1, 2, 3, 4, 5, 6] == list(notes["partitions"])
    for number, part in zip(_numbers(table), table["partitions"], strict=True):
        assert part["uuid"].lower() == notes["partuuids"][number]
        assert part["name"] == notes["partnames"][number]
        assert part["start"] * 512 == notes["partitions"][number]["start"]
    assert table["partitions"][0]["type"] == toolkit.GPT_ESP
    assert notes["fs_types"] == {1: "vfat", 2: "ext4", 3: "ext4", 4: "xfs", 5: "btrfs", 6: "swap"}
    _assert_filesystems_match(linux_gpt_raw)
    assert f"PARTUUID={notes['partuuids'][5]} /home" in notes["fstab"]
    assert f"UUID={notes['fs_uuids'][2]} /boot" in notes["fstab"]
    assert os.stat(linux_gpt_raw.path).st_blocks * 512 < 50 * toolkit.MiB  # sparse


def test_linux_gpt_root_tree(linux_gpt_raw: BuiltImage, tmp_path: Path) -> None:
    part = linux_gpt_raw.notes["partitions"][3]
    with _loop_ro(linux_gpt_raw.path, part["start"], part["size"]) as dev:

        def debugfs(request: str) -> str:
            return commands.run(["debugfs", "-R", request, dev]).stdout

        assert debugfs("cat /etc/hostname") == "web01\n"
        assert "../usr/lib/os-release" in debugfs("stat /etc/os-release")
        assert "VERSION_CODENAME=bookworm" in debugfs("cat /usr/lib/os-release")
        assert "/etc/shadow" in debugfs("stat /etc/evil_abs")
        debugfs(f"dump /usr/bin/ls {tmp_path / 'ls'}")
    dumped = tmp_path / "ls"
    assert dumped.read_bytes()[:4] == b"\x7fELF"
    assert toolkit.sha256_file(dumped) == linux_gpt_raw.notes["file_sha256"]["/usr/bin/ls"]


@pytest.mark.parametrize(
    ("fixture", "fmt"),
    [
        ("linux_gpt_qcow2", "qcow2"),
        ("linux_gpt_vmdk", "vmdk"),
        ("linux_gpt_vhdx", "vhdx"),
        ("linux_gpt_vpc", "vpc"),
    ],
)
def test_linux_gpt_conversions(request: pytest.FixtureRequest, fixture: str, fmt: str) -> None:
    image: BuiltImage = request.getfixturevalue(fixture)
    info = json.loads(_qemu_info(image.path, fmt).stdout)
    assert image.fmt == info["format"] == fmt
    assert info["virtual-size"] == image.notes["virtual_size"]
    assert image.notes["partition_count"] == 6


def test_mbr_logical_layout(mbr_logical_raw: BuiltImage) -> None:
    notes = mbr_logical_raw.notes
    table = _sfdisk(mbr_logical_raw.path)
    assert table["label"] == "dos"
    assert table["id"] == notes["disk_id"]
    assert _numbers(table) == [1, 2, 5, 6, 7] == notes["partition_numbers"]
    assert [p["type"] for p in table["partitions"]] == ["83", "5", "83", "83", "e"]
    assert notes["fs_types"] == {1: "ext4", 5: "ext4", 6: "ext4", 7: "vfat"}
    _assert_filesystems_match(mbr_logical_raw)
    assert notes["os_release"]["ID"] == "rocky"


def test_twenty_parts(twenty_parts_raw: BuiltImage) -> None:
    table = _sfdisk(twenty_parts_raw.path)
    assert _numbers(table) == list(range(1, 21))
    assert twenty_parts_raw.notes["labels"][20] == "p20"
    _assert_filesystems_match(twenty_parts_raw)


def test_windows_ntfs(windows_ntfs_raw: BuiltImage) -> None:
    table = _sfdisk(windows_ntfs_raw.path)
    assert table["label"] == "dos"
    assert [p["type"] for p in table["partitions"]] == ["7"]
    _assert_filesystems_match(windows_ntfs_raw)
    part = windows_ntfs_raw.notes["partitions"][1]
    with _loop_ro(windows_ntfs_raw.path, part["start"], part["size"]) as dev:
        listing = commands.run(["ntfsls", "-p", "/Windows/System32", dev]).stdout.split()
    assert "cmd.exe" in listing


def _ext4_needs_recovery(image: BuiltImage) -> bool:
    with open(image.path, "rb") as fh:
        fh.seek(image.notes["partitions"][1]["start"] + 1024)
        sb = fh.read(1024)
    return bool(int.from_bytes(sb[0x60:0x64], "little") & 0x4)


@pytest.mark.parametrize("fixture", ["dirty_ext4_raw", "broken_journal_ext4_raw"])
def test_ext4_needs_recovery(request: pytest.FixtureRequest, fixture: str) -> None:
    image: BuiltImage = request.getfixturevalue(fixture)
    assert _sfdisk(image.path)["label"] == "gpt"
    assert _ext4_needs_recovery(image)
    assert image.notes["needs_recovery"] is True


def test_broken_ext4_notes(broken_journal_ext4_raw: BuiltImage) -> None:
    notes = broken_journal_ext4_raw.notes
    assert notes["replay_works"] is False
    assert notes["mount_works_with"] == "ro,noload"


@pytest.mark.parametrize(
    ("fixture", "state"), [("dirty_xfs_raw", "DIRTY"), ("broken_log_xfs_raw", None)]
)
def test_xfs_log_state(request: pytest.FixtureRequest, fixture: str, state: str | None) -> None:
    image: BuiltImage = request.getfixturevalue(fixture)
    part = image.notes["partitions"][1]
    with _loop_ro(image.path, part["start"], part["size"]) as dev:
        result = commands.run(["xfs_logprint", "-t", dev], check=False)
    if state is None:
        assert result.returncode != 0  # the log head cannot even be found
        assert image.notes["replay_works"] is False
    else:
        assert f"state: <{state}>" in result.stdout


def test_bad_vmdks_are_refused(corrupt_vmdk: str, text_vmdk: str, missing_extent_vmdk: str) -> None:
    for path in (corrupt_vmdk, text_vmdk, missing_extent_vmdk):
        assert _qemu_info(path, "vmdk").returncode != 0, path
    assert Path(corrupt_vmdk).read_bytes()[:4] == b"KDMV"
    assert "too big" in _qemu_info(corrupt_vmdk, "vmdk").stderr
    assert "No such file" in _qemu_info(missing_extent_vmdk, "vmdk").stderr


def test_not_an_image_probes_as_raw(not_an_image: str) -> None:
    assert json.loads(_qemu_info(not_an_image).stdout)["format"] == "raw"


def test_cache_hit_returns_same_notes(linux_gpt_raw: BuiltImage) -> None:
    again = linux_gpt.linux_gpt_raw()
    assert again == linux_gpt_raw
    assert again.notes == linux_gpt_raw.notes
    assert Path(again.path).parent.parent == toolkit.cache_dir()
    assert samples.build("linux-gpt-raw") == linux_gpt_raw


def test_registry_names_every_recipe() -> None:
    assert {"linux_gpt_raw", "twenty_parts_raw", "gpt_windows_raw", "small_mbr_raw"} <= set(
        samples.SAMPLES
    )
    assert set(samples.SAMPLES) >= samples.SLOW
    with pytest.raises(KeyError, match="no sample named"):
        samples.build("no-such-sample")


def test_cached_builds_once_and_tags_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(toolkit.CACHE_ROOT_ENV, str(tmp_path))
    calls = []

    def build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
        calls.append(work.is_dir())
        (out / "x.raw").write_bytes(b"x")
        return "x.raw", "raw", {"partitions": {1: {"start": 0}}}

    first = toolkit.cached("probe", build, sources=(__file__,))
    again = toolkit.cached("probe", build, sources=(__file__,))
    assert calls == [True]
    assert first == again and again.notes == {"partitions": {1: {"start": 0}}}
    assert Path(first.path).parent.name == f"probe-{toolkit.source_tag(__file__)}"
    assert Path(first.path).parent.parent == tmp_path / toolkit.builder_hash()
    assert not list(Path(first.path).parent.glob("work"))


def test_copy_image_is_sparse_and_identical(mbr_logical_raw: BuiltImage, tmp_path: Path) -> None:
    copy = toolkit.copy_image(mbr_logical_raw, tmp_path)
    assert toolkit.sha256_file(copy) == toolkit.sha256_file(mbr_logical_raw.path)
    assert os.stat(copy).st_blocks * 512 < os.stat(copy).st_size


def test_builds_left_nothing_attached(
    linux_gpt_raw: BuiltImage,
    dirty_ext4_raw: BuiltImage,
    broken_log_xfs_raw: BuiltImage,
    windows_ntfs_raw: BuiltImage,
) -> None:
    root = str(toolkit.cache_dir())  # this builder's images: other builders may be busy
    backing = commands.run(["losetup", "-l", "-n", "-O", "BACK-FILE"]).stdout.split()
    assert not [b for b in backing if b.startswith(root)]
    with open("/proc/self/mountinfo") as fh:
        assert not [line for line in fh if line.split()[4].startswith(root)]


@pytest.mark.parametrize(
    "fixture",
    [
        "linux_gpt_raw",
        "mbr_logical_raw",
        "dirty_ext4_raw",
        "broken_journal_ext4_raw",
        "dirty_xfs_raw",
        "broken_log_xfs_raw",
        "windows_ntfs_raw",
        "twenty_parts_raw",
    ],
)
def test_raw_notes_agree_with_file(request: pytest.FixtureRequest, fixture: str) -> None:
    image: BuiltImage = request.getfixturevalue(fixture)
    assert image.fmt == "raw"
    assert os.path.getsize(image.path) == image.notes["virtual_size"]
    assert len(_sfdisk(image.path)["partitions"]) == image.notes["partition_count"]
    parts = image.notes["partitions"]
    assert image.notes["partuuids"] == {n: p["partuuid"] for n, p in parts.items()}
