"""Attaching real images over qemu-nbd + nbdfuse + loop devices."""

from __future__ import annotations

import os
import subprocess

import pytest

from vmcraft_tasks.craft.errors import (
    AttachError,
    CorruptImageError,
    ImageNotFoundError,
    NotLaunchedError,
    TransientAttachError,
    UnsupportedImageError,
)
from vmcraft_tasks.craft.nbd.helpers import process_alive
from vmcraft_tasks.craft.retry import RetryPolicy
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.toolkit import sha256_file


@pytest.mark.parametrize(
    ("fixture", "fmt"),
    [
        ("linux_gpt_raw", "raw"),
        ("linux_gpt_qcow2", "qcow2"),
        ("linux_gpt_vmdk", "vmdk"),
        ("linux_gpt_vhdx", "vhdx"),
        ("linux_gpt_vpc", "vpc"),
    ],
)
def test_each_format_attaches_and_shows_the_same_partitions(request, fixture, fmt):
    built = request.getfixturevalue(fixture)
    before = sha256_file(built.path)
    with VMCraft(built.path) as g:
        assert g.image.format == fmt
        assert g.backend_name == "fuse"
        assert g.attach_attempts == 1
        parts = g.list_partitions()
        assert [p.number for p in parts] == [1, 2, 3, 4, 5, 6]
        assert {p.number: p.uuid for p in parts} == built.notes["partuuids"]
        assert {p.number: p.name for p in parts} == built.notes["partnames"]
        assert all(p.device and p.device.startswith("/dev/loop") for p in parts)
        types = {fs.partition: fs.type for fs in g.filesystems()}
        assert types == built.notes["fs_types"]
    assert sha256_file(built.path) == before


def test_state_directory_and_helpers_are_gone_after_shutdown(linux_gpt_qcow2):
    g = VMCraft(linux_gpt_qcow2.path).launch()
    state_dir = g.disk.state_dir
    pids = list(g.disk.helper_pids)
    assert os.path.isdir(state_dir) and len(pids) == 2
    g.shutdown()
    g.shutdown()  # idempotent
    assert not os.path.exists(state_dir)
    assert not any(process_alive(pid) for pid in pids)
    with pytest.raises(NotLaunchedError):
        g.list_partitions()


def test_backing_chain_is_followed_and_reported(linux_gpt_qcow2, tmp_path):
    top = tmp_path / "top.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            linux_gpt_qcow2.path,
            "-F",
            "qcow2",
            str(top),
        ],
        check=True,
    )
    # The base lies in another folder: allowed only because it is inside the roots.
    roots = (str(tmp_path), os.path.dirname(linux_gpt_qcow2.path))
    with VMCraft(str(top), settings=CraftSettings(image_roots=roots)) as g:
        assert g.image.backing_chain == (linux_gpt_qcow2.path,)
        assert len(g.list_partitions()) == 6


def test_missing_backing_file_is_named(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "10M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
        check=True,
    )
    base.unlink()
    with pytest.raises(CorruptImageError, match=r"backing chain is broken.*base\.qcow2"):
        VMCraft(str(top)).launch()


def test_missing_image_fails_at_once(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such file"):
        VMCraft(str(tmp_path / "nope.vmdk")).launch()


def test_corrupt_vmdk_fails_at_once(corrupt_vmdk):
    with pytest.raises(CorruptImageError, match="not a readable disk image"):
        VMCraft(corrupt_vmdk).launch()


def test_text_file_named_vmdk_is_refused_not_read_as_raw(text_vmdk):
    with pytest.raises(CorruptImageError, match="invalid VMDK image descriptor"):
        VMCraft(text_vmdk).launch()


def test_missing_vmdk_extent_is_reported(missing_extent_vmdk):
    with pytest.raises(CorruptImageError, match="referenced file is missing"):
        VMCraft(missing_extent_vmdk).launch()


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        CraftSettings(backend="iscsi")


def test_transient_failures_are_retried_and_counted(linux_gpt_raw, flaky_qemu_nbd):
    counter = flaky_qemu_nbd(failures=2)
    settings = CraftSettings(retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05))
    with VMCraft(linux_gpt_raw.path, settings=settings) as g:
        assert g.attach_attempts == 3
        assert len(g.list_partitions()) == 6
    assert counter.read_text().strip() == "3"


def test_retries_give_up_after_the_policy_and_leave_nothing(
    linux_gpt_raw, flaky_qemu_nbd, private_work_dir
):
    flaky_qemu_nbd(failures=5)
    settings = CraftSettings(retry=RetryPolicy(attempts=2, base_s=0.01, cap_s=0.05))
    with pytest.raises(TransientAttachError, match="qemu-nbd exited early") as info:
        VMCraft(linux_gpt_raw.path, settings=settings).launch()
    assert info.value.attempts == 2
    assert not [d for d in os.listdir(private_work_dir) if d.startswith("attach-")]


def test_permanent_helper_failure_is_not_retried(linux_gpt_raw, flaky_qemu_nbd):
    counter = flaky_qemu_nbd(
        failures=5,
        message="qemu-nbd: Failed to blk_new_open: Could not open image: Permission denied",
    )
    with pytest.raises(AttachError) as info:
        VMCraft(linux_gpt_raw.path).launch()
    assert not isinstance(info.value, TransientAttachError)
    assert counter.read_text().strip() == "1"


def test_unsupported_format_is_refused(tmp_path):
    img = tmp_path / "disk.qed"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(img), "10M"], check=True)
    with pytest.raises(UnsupportedImageError, match="unsupported image format 'qed'"):
        VMCraft(str(img)).launch()
