"""The `vmcraft` command as a user runs it: a real process, real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vmcraft_tasks.samples.toolkit import sha256_file


def vmcraft(*args: str, work_dir: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMCRAFT_WORK_DIR=work_dir)
    return subprocess.run(
        [sys.executable, "-m", "vmcraft_tasks.craft.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_inspect_prints_partitions_strategies_and_os_facts(linux_gpt_qcow2, private_work_dir):
    proc = vmcraft("inspect", linux_gpt_qcow2.path, work_dir=private_work_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "format    qcow2" in out
    assert "normal (fuse)" in out  # the ESP, through fusefat
    assert "normal (kernel)" in out
    assert "Debian GNU/Linux 12 (bookworm)" in out
    assert "hostname  web01" in out
    assert "/dev/sda3" in out and "-> partition 3" in out


def test_inspect_json_is_machine_readable(linux_gpt_raw, private_work_dir):
    proc = vmcraft("inspect", "--json", linux_gpt_raw.path, work_dir=private_work_dir)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["image"]["format"] == "raw"
    assert [p["number"] for p in data["partitions"]] == [1, 2, 3, 4, 5, 6]
    assert data["mounts"]["4"]["strategy"] == "normal"
    assert data["roots"][0]["hostname"] == "web01"
    assert data["elapsed_ms"] > 0
    assert not any("/dev/loop" in json.dumps(fs) for fs in data["filesystems"])


def test_dirty_ext4_names_its_strategy_and_leaves_the_source_alone(
    broken_journal_ext4_raw, private_work_dir
):
    before = sha256_file(broken_journal_ext4_raw.path)
    proc = vmcraft("inspect", broken_journal_ext4_raw.path, work_dir=private_work_dir)
    assert proc.returncode == 0, proc.stderr
    assert "ro-noload (kernel), STALE pre-journal view" in proc.stdout
    assert sha256_file(broken_journal_ext4_raw.path) == before


def test_replayed_journal_is_named(dirty_ext4_raw, private_work_dir):
    proc = vmcraft("inspect", dirty_ext4_raw.path, work_dir=private_work_dir)
    assert "normal (kernel), journal replayed in overlay" in proc.stdout


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmcraft: ")
    for word in words:
        assert word in lines[0]


def test_corrupt_image_gives_one_line_and_leaves_nothing(corrupt_vmdk, private_work_dir):
    proc = vmcraft("inspect", corrupt_vmdk, work_dir=private_work_dir)
    assert_one_line_failure(proc, corrupt_vmdk, "not a readable disk image")
    assert not [d for d in os.listdir(private_work_dir) if d.startswith("attach-")]


def test_non_image_file_gives_one_line_and_leaves_nothing(not_an_image, private_work_dir):
    proc = vmcraft("inspect", not_an_image, work_dir=private_work_dir)
    assert_one_line_failure(proc, "no partition table and no filesystem found", "not a disk image")
    assert not [d for d in os.listdir(private_work_dir) if d.startswith("attach-")]


def test_missing_image_gives_one_line(private_work_dir):
    proc = vmcraft("inspect", "/nonexistent/disk.vmdk", work_dir=private_work_dir)
    assert_one_line_failure(proc, "/nonexistent/disk.vmdk", "no such file")


def test_filesystem_without_partition_table_is_inspected(tmp_path, private_work_dir):
    image = tmp_path / "bare.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "bare", str(image)], check=True)
    proc = vmcraft("inspect", "--json", str(image), work_dir=private_work_dir)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["partitions"] == []
    assert data["filesystems"][0]["label"] == "bare"
    assert data["mounts"]["0"]["ok"] is True


def test_kernel_backend_without_the_nbd_module_says_how_to_fix_it(linux_gpt_raw, private_work_dir):
    if os.path.exists("/sys/module/nbd"):
        pytest.skip("this host has the nbd module: the error path cannot be shown")
    proc = vmcraft("inspect", "--backend", "kernel", linux_gpt_raw.path, work_dir=private_work_dir)
    assert_one_line_failure(proc, "nbd kernel module not loaded", "modprobe nbd max_part=16")


def test_inspect_says_what_an_unidentifiable_partition_is(gpt_bios_boot_raw, private_work_dir):
    proc = vmcraft("inspect", gpt_bios_boot_raw.path, work_dir=private_work_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    (bios,) = [line for line in lines if line.strip().startswith("1 ")]
    assert "BIOS boot partition: unrecognised data, no filesystem signature" in bios
    assert "root on partition 3: linux" in proc.stdout
