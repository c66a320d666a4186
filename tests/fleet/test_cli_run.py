"""`vmcraft-tasks demo` / `run` as a user runs them: a private fleet, started and stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import leaks


def redis_servers() -> set[int]:
    found = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == "redis-server":
                    found.add(int(pid))
        except (OSError, ValueError):
            continue
    return found


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


def test_demo_runs_the_sample_batch_and_leaves_nothing_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCRAFT_BROKER")}
    env["VMCRAFT_WORK_DIR"] = str(tmp_path / "work")
    before = leaks.snapshot()
    servers_before = redis_servers()
    proc = subprocess.run(
        # The boot checks the demo turns on are covered in tests/boot (a minute each).
        [
            sys.executable,
            "-m",
            "scheduler.cli",
            "demo",
            "--no-boot-check",
            "--directory",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no broker configured: starting a private fleet (2 hosts)" in proc.stderr
    assert "batch demo [########################] 100.0%" in proc.stdout
    out = tmp_path / "demo" / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["by_status"] == {"done": 4, "failed": 3}
    status = {row["vm_id"]: row["status"] for row in summary["vms"]}
    assert {vm for vm, s in status.items() if s == "done"} == {
        "web01",
        "legacy02",
        "win03",
        "data04",
    }
    for vm in ("web01", "legacy02", "win03"):
        assert (out / f"{vm}.xml").exists() and (out / f"{vm}-disk0.qcow2").exists()
    data = json.loads((out / "data04.json").read_text())
    assert data["data_only"] and not (out / "data04.xml").exists()
    blank = json.loads((out / "blank05.json").read_text())
    assert blank["error"].startswith("no operating system found on the boot disk blank05-disk0")
    for vm in ("web01", "legacy02"):
        report = json.loads((out / f"{vm}.json").read_text())
        assert report["guestcaps"]["block_bus"] == "virtio"
        assert all(k["verified"] for k in report["initramfs"]["kernels"])
    # The private redis-server and workers are gone. Only orphans count: a redis-server
    # another test on this machine runs meanwhile has a live parent.
    assert not leaks.snapshot().new_since(before)
    orphans = [pid for pid in redis_servers() - servers_before if _parent(pid) == 1]
    assert orphans == []
