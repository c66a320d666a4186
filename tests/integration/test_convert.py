"""Converting the sample images with the real qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.convert import (
    TEMP_INFIX,
    ConversionError,
    SourceChangedError,
    TargetExistsError,
    convert_image,
)
from vmcraft_tasks.craft.errors import (
    CommandError,
    CorruptImageError,
    ImageNotFoundError,
    ImagePolicyError,
)
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.samples.toolkit import sha256_file

pytestmark = pytest.mark.integration


def _qemu_img_info(path: Path | str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def _temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if TEMP_INFIX in name]


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (our tmp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def _commands_run() -> tuple[list[list[str]], Callable[[], None]]:
    ran: list[list[str]] = []
    remove = commands.add_observer(lambda argv: ran.append(list(argv)))
    return ran, remove


@pytest.mark.parametrize(
    ("fixture", "source_format", "target_format", "verify_checksum"),
    [
        ("linux_gpt_vmdk", "vmdk", "qcow2", False),
        ("linux_gpt_raw", "raw", "raw", False),
        ("linux_gpt_vmdk", "vmdk", "raw", True),
    ],
)
def test_conversion_produces_an_equal_image_and_leaves_the_source_alone(
    request, tmp_path, fixture, source_format, target_format, verify_checksum
):
    built = request.getfixturevalue(fixture)
    source_sha = sha256_file(built.path)
    source_info = _qemu_img_info(built.path)
    target = tmp_path / f"disk.{target_format}"
    seen: list[float] = []

    result = convert_image(
        built.path,
        str(target),
        target_format=target_format,
        progress=seen.append,
        verify_checksum=verify_checksum,
    )

    info = _qemu_img_info(target)
    assert info["format"] == target_format
    assert info["virtual-size"] == source_info["virtual-size"] == result.virtual_size
    assert result.source == built.path
    assert result.target == str(target)
    assert result.source_format == source_format
    assert result.target_format == target_format
    assert result.source_unchanged
    assert result.target_bytes == target.stat().st_blocks * 512
    assert 0 < result.target_bytes < result.virtual_size  # stayed sparse
    assert result.seconds > 0
    # qcow2 is checked by qemu-img check; raw has no check and says so.
    assert result.checked is (target_format == "qcow2")
    assert bool(result.notes) is (target_format == "raw")
    # Progress: strictly increasing, ending at 100.
    assert seen
    assert seen == sorted(set(seen))
    assert seen[-1] == 100.0
    # Same guest-visible content, and the source byte-identical.
    subprocess.run(
        ["qemu-img", "compare", "-f", source_format, "-F", target_format, built.path, target],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert sha256_file(built.path) == source_sha
    assert os.listdir(tmp_path) == [target.name]
    assert json.loads(json.dumps(result.to_dict()))["target"] == str(target)


def test_corrupt_source_fails_at_once_and_writes_nothing(tmp_path, corrupt_vmdk):
    ran, remove = _commands_run()
    started = time.monotonic()
    try:
        with pytest.raises(CorruptImageError) as info:
            convert_image(corrupt_vmdk, str(tmp_path / "out.qcow2"))
    finally:
        remove()
    assert time.monotonic() - started < 5
    assert info.value.image == corrupt_vmdk
    assert not [argv for argv in ran if argv[:2] == ["qemu-img", "convert"]]
    assert os.listdir(tmp_path) == []


def test_missing_source_names_it(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such file"):
        convert_image(str(tmp_path / "absent.vmdk"), str(tmp_path / "out.qcow2"))
    assert os.listdir(tmp_path) == []


def test_existing_target_is_refused_and_kept(tmp_path, linux_gpt_vmdk):
    target = tmp_path / "web01.qcow2"
    target.write_text("someone else's image\n")
    ran, remove = _commands_run()
    try:
        with pytest.raises(TargetExistsError) as info:
            convert_image(linux_gpt_vmdk.path, str(target))
    finally:
        remove()
    assert info.value.target == str(target)
    assert str(target) in str(info.value)
    assert "overwrite=True" in str(info.value)
    assert target.read_text() == "someone else's image\n"
    assert not [argv for argv in ran if argv[:2] == ["qemu-img", "convert"]]
    assert os.listdir(tmp_path) == [target.name]


def test_overwrite_replaces_an_existing_target(tmp_path, linux_gpt_vmdk):
    target = tmp_path / "web01.qcow2"
    target.write_text("stale\n")
    result = convert_image(linux_gpt_vmdk.path, str(target), overwrite=True)
    assert _qemu_img_info(target)["format"] == "qcow2"
    assert result.checked
    assert os.listdir(tmp_path) == [target.name]


def test_the_source_is_never_a_target(image_copy, linux_gpt_vmdk):
    source = image_copy(linux_gpt_vmdk)
    before = sha256_file(source)
    with pytest.raises(ConversionError, match="the target is the source"):
        convert_image(source, source, overwrite=True)
    assert sha256_file(source) == before
    assert _temp_files(Path(source).parent) == []


def test_a_missing_target_directory_is_named(tmp_path, linux_gpt_vmdk):
    with pytest.raises(ConversionError, match="directory does not exist"):
        convert_image(linux_gpt_vmdk.path, str(tmp_path / "nope" / "out.qcow2"))


def test_timeout_kills_qemu_img_and_leaves_no_temp_file(tmp_path, linux_gpt_raw):
    target = tmp_path / "out.qcow2"
    during: list[list[str]] = []

    def slow_reader(_: float) -> None:
        # Hold the reader past the deadline while qemu-img is running: the timeout
        # fires deterministically, however fast the copy itself is.
        during.append(_temp_files(tmp_path))
        time.sleep(0.6)

    with pytest.raises(CommandError) as info:
        convert_image(linux_gpt_raw.path, str(target), progress=slow_reader, timeout_s=0.3)
    assert info.value.timed_out
    assert info.value.argv[:2] == ["qemu-img", "convert"]
    assert during and during[0]  # the temporary file existed while qemu-img ran
    assert os.listdir(tmp_path) == []
    assert _processes_mentioning(str(tmp_path)) == []


def test_a_tiny_timeout_leaves_nothing(tmp_path, linux_gpt_vmdk):
    with pytest.raises(CommandError) as info:
        convert_image(linux_gpt_vmdk.path, str(tmp_path / "out.qcow2"), timeout_s=0.001)
    assert info.value.timed_out
    assert os.listdir(tmp_path) == []
    assert _processes_mentioning(str(tmp_path)) == []


def test_an_interrupt_mid_copy_leaves_no_temp_file(tmp_path, linux_gpt_raw):
    class Interrupted(BaseException):
        """Stands in for KeyboardInterrupt or a task's time limit."""

    def interrupt(value: float) -> None:
        raise Interrupted(value)

    with pytest.raises(Interrupted):
        convert_image(linux_gpt_raw.path, str(tmp_path / "out.qcow2"), progress=interrupt)
    assert os.listdir(tmp_path) == []
    assert _processes_mentioning(str(tmp_path)) == []


def test_a_source_changed_during_conversion_publishes_nothing(tmp_path, image_copy, linux_gpt_vmdk):
    source = image_copy(linux_gpt_vmdk)
    out = tmp_path / "out"
    out.mkdir()

    def touch_source(_: float) -> None:
        # Another writer: a new mtime is a new identity.
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))

    with pytest.raises(SourceChangedError, match="modified or replaced"):
        convert_image(source, str(out / "out.qcow2"), progress=touch_source)
    assert os.listdir(out) == []


def test_a_target_that_appears_during_conversion_is_not_replaced(tmp_path, linux_gpt_vmdk):
    target = tmp_path / "out.qcow2"

    def someone_else_writes(_: float) -> None:
        if not target.exists():
            target.write_text("written meanwhile\n")

    with pytest.raises(TargetExistsError, match="appeared during conversion"):
        convert_image(linux_gpt_vmdk.path, str(target), progress=someone_else_writes)
    assert target.read_text() == "written meanwhile\n"
    assert os.listdir(tmp_path) == [target.name]


def test_a_source_outside_the_configured_roots_is_refused(tmp_path, linux_gpt_vmdk):
    elsewhere = tmp_path / "roots"
    elsewhere.mkdir()
    settings = CraftSettings(image_roots=(str(elsewhere),))
    ran, remove = _commands_run()
    try:
        with pytest.raises(ImagePolicyError, match="outside the image roots"):
            convert_image(linux_gpt_vmdk.path, str(tmp_path / "out.qcow2"), settings=settings)
    finally:
        remove()
    assert ran == []  # refused before qemu-img saw the image
    assert os.listdir(tmp_path) == ["roots"]


def test_the_conversion_reads_the_pinned_graph_and_records_its_output(tmp_path, linux_gpt_vmdk):
    ran, remove = _commands_run()
    try:
        result = convert_image(linux_gpt_vmdk.path, str(tmp_path / "out.qcow2"))
    finally:
        remove()
    (copy,) = [argv for argv in ran if argv[:2] == ["qemu-img", "convert"]]
    assert copy[-2].startswith('json:{"driver":"vmdk"')
    assert linux_gpt_vmdk.path not in copy
    assert result.target_file is not None
    assert result.target_file.inode == (tmp_path / "out.qcow2").stat().st_ino
