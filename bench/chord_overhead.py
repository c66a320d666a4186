"""Chord overhead per mount subtask: the fleet's mount fan-out against the library's.

    python -m bench.chord_overhead [runs]

Starts a private redis-server and one real worker (concurrency 2, max_mounts 2), then
alternates (A B A B ...) the library's `mount_all_parallel(max_workers=2)` and the
fleet's chord on a 20-partition disk. The overhead per subtask is the difference of
the two mount phases divided by the number of subtasks.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scheduler.submit import FleetClient
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.inspect_disk import private_mountpoint
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.embedded.fleet import Fleet
from vmcraft_tasks.embedded.redis import redis_server
from vmcraft_tasks.samples.recipes.twenty_parts import twenty_parts_raw
from vmcraft_tasks.samples.toolkit import copy_image

WORKERS = 2


def overlay(base: str, directory: Path, n: int) -> str:
    """A qcow2 over a copy of `base` in `directory`: image checks refuse a backing file
    outside the image's own directory (no image roots are configured here)."""
    top = directory / f"vm{n:03d}.qcow2"
    local = directory / Path(base).name
    if not local.exists():
        copy_image(base, directory)
    base = local.name  # relative: resolved next to the overlay
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", str(top)], check=True
    )
    return str(top)


def library_mount_phase(image: str, work_dir: str) -> tuple[float, int]:
    settings = CraftSettings(work_dir=work_dir)
    with VMCraft(image, settings=settings, cache=InProcessTTLCache()) as g:
        parts = g.list_partitions()
        g.filesystems()
        pairs = [(p.number, private_mountpoint(g, p.number)) for p in parts]
        started = time.perf_counter()
        results = g.mount_all_parallel(pairs, max_workers=WORKERS)
        elapsed = time.perf_counter() - started
        assert all(results.values())
    return elapsed, len(pairs)


def fleet_mount_phase(client: FleetClient, image: str) -> tuple[float, int]:
    job = client.submit_inspect(image)
    record = client.wait(job, timeout_s=120)
    assert record.status == "done", record.error
    steps = client.jobs.steps(job)
    scanned = next(s["at"] for s in steps if s["task"] == "vmcraft.vm.scan")
    inspected = next(s["at"] for s in steps if s["task"] == "vmcraft.vm.inspect")
    mounts = sum(1 for s in steps if s["task"] == "vmcraft.vm.mount_partition")
    return inspected - scanned, mounts


def main(runs: int = 5) -> None:
    base = twenty_parts_raw().path
    with redis_server() as server, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fleet = Fleet(
            server=server,
            work_root=root / "work",
            log_dir=root,
            overrides={"VMCRAFT_MAX_MOUNTS": str(WORKERS), "VMCRAFT_MAX_ATTACHED": "1"},
        )
        fleet.start("h1", concurrency=WORKERS)
        fleet.wait_online(["h1"])
        client = FleetClient(fleet.settings())
        lib, chord = [], []
        try:
            fleet_mount_phase(client, overlay(base, root, 0))  # warm-up
            for n in range(1, runs + 1):
                lib.append(library_mount_phase(overlay(base, root, 2 * n), str(root / "lib")))
                chord.append(fleet_mount_phase(client, overlay(base, root, 2 * n + 1)))
        finally:
            client.close()
            fleet.stop_all()
    subtasks = chord[0][1]
    lib_ms = [t * 1000 for t, _ in lib]
    chord_ms = [t * 1000 for t, _ in chord]
    per_task = [(c - lb) / subtasks for c, lb in zip(chord_ms, lib_ms, strict=True)]
    print(f"{'variant':<34} {'median ms':>10} {'min':>8} {'max':>8}")
    for name, values in (
        (f"library mount_all_parallel({WORKERS})", lib_ms),
        (f"fleet chord, {subtasks} subtasks", chord_ms),
        ("overhead per subtask", per_task),
    ):
        median = statistics.median(values)
        print(f"{name:<34} {median:>10.2f} {min(values):>8.2f} {max(values):>8.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
