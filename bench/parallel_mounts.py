"""Parallel mounts against the guide's table: sequential, thread pools and the fleet chord.

    python -m bench.parallel_mounts [--quick]

For GPT disks with 3, 5, 10 and 20 ext4 partitions (16 MiB each, one raw image per
count, built once and cached by the samples toolkit: recipes/gpt_ext4.py) it alternates, round after
round (A B C D E A B C D E ...):

  (a) a sequential loop of `g.mount(dev, mp)`,
  (b)-(d) `g.mount_all_parallel(pairs, max_workers=2 / 4 / 8)`,
  (e) the fleet: one real worker (concurrency 2, VMCRAFT_MAX_MOUNTS=4) on a private
      redis-server; `FleetClient.submit_inspect(image)` and the mount phase read from
      the job's step records (end of 'vmcraft.vm.scan' to end of 'vmcraft.vm.inspect',
      as bench/chord_overhead.py measures it: chord dispatch + mounts + chord body).

(a)-(d) time only the mount phase: each sample attaches the disk afresh, lists the
partitions and probes them with one `blkid` (both mount paths ask blkid for the type;
a warm cache keeps that probe out of the timing), then times the mounts; unmounting
and detaching happen outside the timing. Alongside the wall time each sample records
CPU time (this process, its reaped children, the whole host) for a quick profile.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Series, alternate, ms, save, table
from scheduler.submit import FleetClient
from vmcraft_tasks import jobs
from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.nbd.fuse import FuseNbdBackend
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.embedded.fleet import Fleet
from vmcraft_tasks.embedded.redis import RedisServer, redis_server
from vmcraft_tasks.samples.recipes.gpt_ext4 import gpt_ext4_raw
from vmcraft_tasks.samples.toolkit import BuiltImage
from worker import timeline

COUNTS = (3, 5, 10, 20)
PART_MIB = 16
WORKERS = (2, 4, 8)
ROUNDS, QUICK_ROUNDS = 7, 3

FLEET_HOST = "h1"
FLEET_CONCURRENCY = 2
FLEET_MAX_MOUNTS = 4
FLEET_JOB_TIMEOUT_S = 120.0
SCAN_TASK = "vmcraft.vm.scan"
INSPECT_TASK = "vmcraft.vm.inspect"
MOUNT_TASK = "vmcraft.vm.mount_partition"

SEQUENTIAL = "sequential"
FLEET = "fleet chord"
VARIANTS = (SEQUENTIAL, *(f"parallel({w})" for w in WORKERS), FLEET)

# The guide's "Performance Benchmarks" table: partitions -> (sequential s, parallel(4) s).
GUIDE_S = {3: (6.2, 3.1), 5: (10.5, 4.8), 10: (21.3, 8.7), 20: (42.1, 15.2)}

# ------------------------------------------------------------------------- images


def gpt_ext4_image(count: int, part_mib: int = PART_MIB) -> BuiltImage:
    """A raw GPT disk with `count` ext4 partitions of `part_mib` MiB, cached on disk."""
    return gpt_ext4_raw(count, part_mib)


# ------------------------------------------------------------------------- cleanup


def release_leftover_attaches(work_dir: str | os.PathLike[str]) -> list[str]:
    """Release attach state directories still under `work_dir` (after a crash); by record."""
    released = []
    for state_dir in sorted(Path(work_dir).rglob("attach-*")):
        if state_dir.is_dir() and (state_dir / "resources.json").exists():
            FuseNbdBackend().release(str(state_dir))
            released.append(str(state_dir))
    return released


# ------------------------------------------------------------------------- CPU accounting


def _host_busy_s() -> float:
    """Non-idle CPU time of the whole host since boot (all cores; /proc/stat, 10 ms ticks)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_now() -> tuple[float, float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        me.ru_utime + me.ru_stime,
        kids.ru_utime + kids.ru_stime,
        _host_busy_s(),
    )


# ------------------------------------------------------------------------- variants


def library_sample(
    image: str, work_dir: str, workers: int | None, profile: list[dict[str, Any]]
) -> float:
    """One attach; the mount phase only (seconds). workers=None: the sequential loop."""
    g = VMCraft(image, settings=CraftSettings(work_dir=work_dir), cache=InProcessTTLCache())
    try:
        g.launch()
        parts = g.list_partitions()
        g.filesystems()  # one blkid for all partitions: the type both mount paths ask for
        pairs = [(p.device or "", g.private_mountpoint(f"p{p.number}")) for p in parts]
        ran: list[str] = []
        stop_counting = commands.add_observer(lambda argv: ran.append(argv[0]))
        cpu_before = _cpu_now()
        started = time.perf_counter()
        try:
            if workers is None:
                for device, mountpoint in pairs:
                    g.mount(device, mountpoint)
                failed = []
            else:
                results = g.mount_all_parallel(pairs, max_workers=workers)
                failed = [f"{mp}: {r.error}" for mp, r in results.items() if not r]
        finally:
            elapsed = time.perf_counter() - started
            cpu_after = _cpu_now()
            stop_counting()
        if failed or len(g.mounts()) != len(pairs):
            raise RuntimeError(f"{image}: not every partition mounted: {failed}")
        self_s, kids_s, host_s = (b - a for a, b in zip(cpu_before, cpu_after, strict=True))
        profile.append(
            {
                "wall_s": elapsed,
                "python_cpu_s": self_s,
                "children_cpu_s": kids_s,
                "host_busy_s": host_s,
                "commands": len(ran),
            }
        )
        return elapsed
    finally:
        try:
            g.umount_all()
        finally:
            g.shutdown()


def fleet_sample(
    client: FleetClient, image: str, count: int, profile: list[dict[str, Any]]
) -> float:
    """One job through the fleet; the mount phase from its step records (seconds)."""
    job = client.submit_inspect(image)
    record = client.wait(job, timeout_s=FLEET_JOB_TIMEOUT_S)
    if record.status != "done":
        raise RuntimeError(f"fleet job {job} ended {record.status}: {record.error}")
    steps = client.jobs.steps(job)
    scanned = next(s["at"] for s in steps if s["task"] == SCAN_TASK)
    inspected = next(s["at"] for s in steps if s["task"] == INSPECT_TASK)
    subtasks = sum(1 for s in steps if s["task"] == MOUNT_TASK)
    mounted = [m for m in (record.result or {}).get("mounts", {}).values() if m.get("ok")]
    if subtasks != count or len(mounted) != count:
        raise RuntimeError(f"fleet job {job}: {subtasks} mount steps, {len(mounted)} mounted")
    # The mounts themselves inside the chord: first mount start to last mount end.
    spans = [
        iv
        for iv in timeline.intervals(client.state, FLEET_HOST, "mount")
        if iv.ident.startswith(f"{job}:")
    ]
    profile.append(
        {
            "phase_s": inspected - scanned,
            # The scan step's record is written only after it has dispatched the chord,
            # and mount subtasks already run on the other pool process meanwhile; the job
            # record's 'mounting' time is stamped just before that dispatch.
            "mounting_to_inspect_s": inspected - record.timestamps[jobs.MOUNTING],
            "mount_span_s": max(iv.end for iv in spans) - min(iv.start for iv in spans),
            "first_mount_before_scan_record_s": scanned - min(iv.start for iv in spans),
            "subtasks": subtasks,
        }
    )
    return float(inspected - scanned)


def start_fleet(server: RedisServer, root: Path) -> tuple[Fleet, FleetClient]:
    fleet = Fleet(
        server=server,
        work_root=root / "fleet-work",
        log_dir=root,
        overrides={"VMCRAFT_MAX_MOUNTS": str(FLEET_MAX_MOUNTS)},
    )
    try:
        fleet.start(FLEET_HOST, concurrency=FLEET_CONCURRENCY)
        fleet.wait_online([FLEET_HOST])
        env = fleet.env()
        client = FleetClient(
            FleetSettings(
                broker_url=env["VMCRAFT_BROKER_URL"],
                result_backend=env["VMCRAFT_RESULT_BACKEND"],
                cache_url=env["VMCRAFT_CACHE_URL"],
            )
        )
    except BaseException:
        fleet.stop_all()
        raise
    return fleet, client


def variants_for(
    image: str, count: int, work_dir: str, client: FleetClient
) -> tuple[dict[str, Callable[[], float]], dict[str, list[dict[str, Any]]]]:
    profiles: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}

    def library(name: str, workers: int | None) -> Callable[[], float]:
        return lambda: library_sample(image, work_dir, workers, profiles[name])

    variants: dict[str, Callable[[], float]] = {SEQUENTIAL: library(SEQUENTIAL, None)}
    for w in WORKERS:
        variants[f"parallel({w})"] = library(f"parallel({w})", w)
    variants[FLEET] = lambda: fleet_sample(client, image, count, profiles[FLEET])
    return variants, profiles


def measure_count(
    count: int, rounds: int, work_dir: str, client: FleetClient
) -> tuple[dict[str, Series], dict[str, list[dict[str, Any]]]]:
    image = gpt_ext4_image(count).path
    variants, profiles = variants_for(image, count, work_dir, client)
    alternate(variants, 1)  # warm-up round: page cache, worker imports; not recorded
    for samples in profiles.values():
        samples.clear()
    return alternate(variants, rounds), profiles


def spawn_floor_ms(batches: int = 7, calls: int = 10) -> float:
    """What starting one `mount` process costs through the runner, doing no mount at all
    (median over batches, ms per call)."""
    per_call = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(calls):
            commands.run(["mount", "--version"], timeout=10)
        per_call.append(ms(time.perf_counter() - started) / calls)
    return statistics.median(per_call)


# ------------------------------------------------------------------------- report


def _cell(s: Series) -> str:
    return f"{ms(s.median):.1f} [{ms(s.low):.1f}-{ms(s.high):.1f}]"


def _best_parallel(series: dict[str, Series]) -> str:
    return min((f"parallel({w})" for w in WORKERS), key=lambda n: series[n].median)


def main_table(
    results: dict[int, dict[str, Series]], profiles: dict[int, dict[str, list[dict[str, Any]]]]
) -> str:
    rows = []
    for count, series in results.items():
        best = _best_parallel(series)
        speedup = series[SEQUENTIAL].median / series[best].median
        guide_seq, guide_par = GUIDE_S[count]
        whole = statistics.median(s["mounting_to_inspect_s"] for s in profiles[count][FLEET])
        rows.append(
            [
                count,
                *(_cell(series[name]) for name in VARIANTS),
                f"{ms(whole):.1f}",
                f"{speedup:.2f}x ({best})",
                f"{guide_seq:.1f} s",
                f"{guide_par:.1f} s",
                f"{guide_seq / guide_par:.1f}x",
            ]
        )
    header = [
        "partitions",
        "sequential ms",
        "parallel(2) ms",
        "parallel(4) ms",
        "parallel(8) ms",
        "fleet chord ms",
        "fleet 'mounting' -> inspect ms",
        "best parallel vs sequential",
        "guide sequential",
        "guide parallel(4)",
        "guide speedup",
    ]
    return table("Mount phase, median [min-max] ms", header, rows)


def slower_than_sequential(
    results: dict[int, dict[str, Series]], names: tuple[str, ...]
) -> list[dict[str, Any]]:
    found = []
    for count, series in results.items():
        seq = series[SEQUENTIAL].median
        for name in names:
            if series[name].median > seq:
                found.append(
                    {
                        "partitions": count,
                        "variant": name,
                        "median_ms": ms(series[name].median),
                        "sequential_median_ms": ms(seq),
                        "ratio": series[name].median / seq,
                    }
                )
    return found


def _describe(slower: list[dict[str, Any]]) -> str:
    if not slower:
        return "never"
    return "; ".join(
        f"{s['partitions']} partitions, {s['variant']}: {s['median_ms']:.1f} ms vs "
        f"{s['sequential_median_ms']:.1f} ms ({s['ratio']:.2f}x)"
        for s in slower
    )


def _sum(samples: list[dict[str, Any]], key: str) -> float:
    return float(sum(s[key] for s in samples))


def profile_table(
    profiles: dict[int, dict[str, list[dict[str, Any]]]], cores: int, floor_ms: float
) -> str:
    rows = []
    for count, by_variant in profiles.items():
        for name in VARIANTS[:-1]:
            samples = by_variant[name]
            wall = _sum(samples, "wall_s")
            mounts = count * len(samples)
            rows.append(
                [
                    count,
                    name,
                    f"{ms(wall) / mounts:.2f}",
                    f"{ms(_sum(samples, 'python_cpu_s')) / mounts:.2f}",
                    f"{ms(_sum(samples, 'children_cpu_s')) / mounts:.2f}",
                    f"{_sum(samples, 'host_busy_s') / wall:.2f} of {cores}",
                ]
            )
        fleet = by_variant[FLEET]
        whole = statistics.median(s["mounting_to_inspect_s"] for s in fleet)
        span = statistics.median(s["mount_span_s"] for s in fleet)
        early = statistics.median(s["first_mount_before_scan_record_s"] for s in fleet)
        rows.append(
            [
                count,
                f"{FLEET}: first mount start to last mount end {ms(span):.1f} ms; first "
                f"mount started {ms(early):.1f} ms before the scan step's record",
                f"{ms(whole) / count:.2f}",
                "-",
                "-",
                "-",
            ]
        )
    header = [
        "partitions",
        "variant",
        "wall ms per mount",
        "python CPU ms per mount",
        "mount(8) CPU ms per mount",
        "host cores busy",
    ]
    title = (
        "Quick profile: where a mount's time goes (all rounds; a bare `mount --version` "
        f"through the runner costs {floor_ms:.2f} ms)"
    )
    return table(title, header, rows)


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    load_before = os.getloadavg()
    rounds = QUICK_ROUNDS if quick else ROUNDS
    for count in COUNTS:
        gpt_ext4_image(count)  # build (or find) every image before anything is timed
    results: dict[int, dict[str, Series]] = {}
    profiles: dict[int, dict[str, list[dict[str, Any]]]] = {}
    with (
        redis_server() as server,
        tempfile.TemporaryDirectory(prefix="vmcraft-bench-mounts-") as tmp,
    ):
        root = Path(tmp)
        work_dir = str(root / "lib-work")
        fleet, client = start_fleet(server, root)
        try:
            for count in COUNTS:
                results[count], profiles[count] = measure_count(count, rounds, work_dir, client)
            floor = spawn_floor_ms()
        finally:
            try:
                client.close()
                fleet.stop_all()
            finally:
                release_leftover_attaches(root)
    cores = os.cpu_count() or 1
    slower = slower_than_sequential(results, VARIANTS[1:-1])
    fleet_slower = slower_than_sequential(results, (FLEET,))
    lines = [
        main_table(results, profiles),
        f"Library parallel slower than sequential (median): {_describe(slower)}",
        f"Fleet chord slower than sequential (median): {_describe(fleet_slower)}\n",
        profile_table(profiles, cores, floor),
        f"{rounds} rounds per variant, alternated; ext4 partitions of {PART_MIB} MiB; fleet: "
        f"1 worker, concurrency {FLEET_CONCURRENCY}, VMCRAFT_MAX_MOUNTS={FLEET_MAX_MOUNTS}. "
        "'fleet chord' is the step-record measure of bench/chord_overhead.py (end of "
        f"'{SCAN_TASK}' to end of '{INSPECT_TASK}': chord dispatch, mount subtasks, chord "
        "body); 'mounting' -> inspect starts at the job record's 'mounting' stamp, taken "
        "before the scan step dispatches the chord, so it also holds the mounts that ran "
        "while the scan step was still dispatching. Load average (1 min) before/after: "
        f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}.\n",
    ]
    data = {
        "rounds": rounds,
        "part_mib": PART_MIB,
        "fleet": {
            "concurrency": FLEET_CONCURRENCY,
            "max_mounts": FLEET_MAX_MOUNTS,
            "phase": f"step record '{SCAN_TASK}' -> '{INSPECT_TASK}'",
        },
        "guide_s": {str(c): {"sequential": s, "parallel4": p} for c, (s, p) in GUIDE_S.items()},
        "results": {
            str(count): {name: s.to_dict() for name, s in series.items()}
            for count, series in results.items()
        },
        "slower_than_sequential": slower,
        "fleet_slower_than_sequential": fleet_slower,
        "profile": {str(count): by_variant for count, by_variant in profiles.items()},
        "spawn_floor_ms": floor,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    return "\n".join(lines), data


if __name__ == "__main__":
    quick_run = "--quick" in sys.argv[1:]
    text, result = run(quick=quick_run)
    print(text)
    # A quick run never overwrites the full run's results.
    print(f"saved {save('parallel_mounts_quick' if quick_run else 'parallel_mounts', result)}")
