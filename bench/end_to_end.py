"""End to end: the guide's 10-partition migration workflow, through the library and the
fleet, and a batch of small VMs through 1, 2 and 3 simulated hosts.

    .venv/bin/python -m bench.end_to_end [--quick]

(a) Library: attach, scan x10, mount all, blkid x10, inspect, detach on a 10-partition
    Ubuntu-style disk, each step timed, against the performance guide's "Performance
    Comparison" (203.5 s before v9.1, 30.5 s after) and the target of under 0.5 s.
(b) Fleet: the same disk submitted to one worker host (concurrency 2) with
    FleetClient.submit_inspect, submit -> done, broken down by the job's state
    timestamps and step records; target under 1 s.
(c) Batch: 50 small VMs (12 with --quick), each a distinct qcow2 overlay of one small
    3-partition disk, fixes off, through scheduler.batch on fleets of 1, 2 and 3 hosts
    (concurrency 2 each), against a plain sequential loop over the library doing the
    same per-VM work (convert, scan, mount all, inspect, shutdown); target: 2 hosts at
    least 1.5x the loop's VMs per minute.

Variants run alternately (common.alternate) and are reported as medians with min and
max. Everything started here (redis-server, workers, attaches, temp dirs) is stopped
and removed before run() returns.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from bench import common
from scheduler.batch import batch_status, submit_batch
from scheduler.submit import FleetClient
from vmcraft_tasks.batches import job_id_for
from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.convert import convert_image
from vmcraft_tasks.craft.inspect_disk import find_roots, private_mountpoint
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.embedded.fleet import Fleet
from vmcraft_tasks.embedded.redis import RedisServer, redis_server
from vmcraft_tasks.jobs import JobRecord
from vmcraft_tasks.outputs import step_timings
from vmcraft_tasks.samples.recipes.small_mbr import small_mbr_raw
from vmcraft_tasks.samples.recipes.ten_parts_ubuntu import ten_parts_ubuntu_raw
from vmcraft_tasks.samples.toolkit import copy_image
from worker import timeline

NAME = "end_to_end"

# The guide's "Performance Comparison", 10-partition Ubuntu server migration (seconds).
GUIDE_BEFORE = {"attach": 2.1, "scan x10": 53.0, "mount all": 21.4, "blkid x10": 127.0}
GUIDE_AFTER = {"attach": 2.1, "scan x10": 5.8, "mount all": 8.7, "blkid x10": 13.9}
GUIDE_BEFORE_TOTAL_S = 203.5
GUIDE_AFTER_TOTAL_S = 30.5
LIBRARY_TARGET_S = 0.5
FLEET_TARGET_S = 1.0
BATCH_TARGET_SPEEDUP = 1.5  # 2 hosts against the sequential loop, VMs per minute

WORKERS = 2  # concurrency of every worker host
SCANS = 10
BLKIDS = 10
HOST_COUNTS = (1, 2, 3)
IDLE_WINDOW_S = 2.0
JOB_TIMEOUT_S = 120.0
BATCH_TIMEOUT_S = 900.0

# --------------------------------------------------------------------------- sample disks

# The disks are sample recipes: vmcraft_tasks/samples/recipes/ten_parts_ubuntu.py (the
# guide's 10-partition Ubuntu server) and small_mbr.py (the batch's VMs).


def overlay(base: str, directory: Path, name: str) -> str:
    """A qcow2 on top of `base`: a distinct disk (own identity) in milliseconds.

    The overlays share one sparse copy of `base` in `directory`: image checks refuse a
    backing file outside the image's own directory (no image roots are configured)."""
    local = directory / Path(base).name
    if not local.exists():
        copy_image(base, directory)
    top = directory / f"{name}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", local.name, "-F", "raw", str(top)],
        check=True,
    )
    return str(top)


# --------------------------------------------------------------------------- process counting


counting_processes = commands.recorded


def describe_processes(ran: list[str]) -> str:
    if not ran:
        return "-"
    counts: dict[str, int] = {}
    for name in ran:
        counts[name] = counts.get(name, 0) + 1
    return " ".join(f"{n}x{name}" for name, n in sorted(counts.items()))


# --------------------------------------------------------------------------- (a) library

LIBRARY_STEPS = ("attach", "scan x10", "mount all", "blkid x10", "inspect", "detach")


def library_workflow(image: str, work_dir: str) -> tuple[dict[str, float], dict[str, str]]:
    """The guide's workflow, each step timed; a fresh in-process cache, so scan 1 misses."""
    g = VMCraft(image, settings=CraftSettings(work_dir=work_dir), cache=InProcessTTLCache())
    times: dict[str, float] = {}
    procs: dict[str, str] = {}

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        with counting_processes() as ran:
            started = time.perf_counter()
            yield
            times[name] = time.perf_counter() - started
        procs[name] = describe_processes(ran)

    try:
        with step("attach"):
            g.launch()
        with step("scan x10"):
            for _ in range(SCANS):
                parts = g.list_partitions()
        pairs = [(p.number, private_mountpoint(g, p.number)) for p in parts]
        with step("mount all"):
            results = g.mount_all_parallel(pairs)
        with step("blkid x10"):
            for p in parts[:BLKIDS]:
                g.blkid(p.number)
        with step("inspect"):
            mounts = {n: results[mp] for n, mp in pairs}
            roots = find_roots(g, parts, g.filesystems(), mounts)
    finally:
        with step("detach"):
            g.shutdown()
    mounted = sum(1 for r in results.values() if r.ok)
    if len(parts) != 10 or mounted != 9 or [r.distro for r in roots] != ["ubuntu"]:
        raise RuntimeError(f"unexpected: {len(parts)} parts, {mounted} mounted, roots {roots}")
    times["total"] = sum(times.values())
    return times, procs


# --------------------------------------------------------------------------- fleet plumbing


@contextlib.contextmanager
def running_fleet(
    server: RedisServer, root: Path, hosts: int, overrides: dict[str, str] | None = None
) -> Iterator[tuple[Fleet, FleetClient]]:
    """`hosts` real worker hosts (concurrency 2 each) on `server`; all stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"  # the workers' TMPDIR: what they leave goes with `root`
    tmp.mkdir()
    overrides = {"TMPDIR": str(tmp), **(overrides or {})}
    fleet = Fleet(server=server, work_root=root / "work", log_dir=root, overrides=overrides)
    client = None
    try:
        names = [f"h{n}" for n in range(1, hosts + 1)]
        for name in names:
            fleet.start(name, concurrency=WORKERS)
        fleet.wait_online(names)
        env = fleet.env()
        client = FleetClient(
            FleetSettings(
                broker_url=env["VMCRAFT_BROKER_URL"],
                result_backend=env["VMCRAFT_RESULT_BACKEND"],
                cache_url=env["VMCRAFT_CACHE_URL"],
            )
        )
        yield fleet, client
    finally:
        if client is not None:
            client.close()
        fleet.stop_all()


def _proc_cpu_s(pid: int) -> tuple[float, float]:
    """(own utime + stime, utime + stime of the children it reaped) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


CPU_KINDS = ("celery main", "pool (python)", "tools", "redis", "client")


def fleet_cpu_s(fleet: Fleet) -> dict[str, float]:
    """CPU seconds of the workers: main processes, pool processes, and the programs the
    pool processes ran and reaped (qemu-img, sfdisk, blkid, mount, qemu-nbd, ...)."""
    cpu = dict.fromkeys(CPU_KINDS[:3], 0.0)
    for host in fleet.hosts.values():
        cpu["celery main"] += _proc_cpu_s(host.pid)[0]
        for child in _children(host.pid):
            own, reaped = _proc_cpu_s(child)
            cpu["pool (python)"] += own
            cpu["tools"] += reaped
    return cpu


def _own_cpu_s() -> tuple[float, float]:
    """(this process, the children it reaped) in CPU seconds."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


@dataclass
class RedisCounters:
    commands: int
    cpu_s: float
    by_command: dict[str, int]

    @classmethod
    def read(cls, client: redis.Redis) -> RedisCounters:
        stats = client.info("stats")
        cpu = client.info("cpu")
        per = client.info("commandstats")
        return cls(
            commands=int(stats["total_commands_processed"]),
            cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            by_command={k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in per.items()},
        )

    def since(self, before: RedisCounters) -> RedisCounters:
        return RedisCounters(
            commands=self.commands - before.commands,
            cpu_s=self.cpu_s - before.cpu_s,
            by_command={
                k: v - before.by_command.get(k, 0)
                for k, v in self.by_command.items()
                if v - before.by_command.get(k, 0)
            },
        )


MOUNT_TASK = "vmcraft.vm.mount_partition"


def mount_spans(
    client: FleetClient, hosts: list[str], job_ids: set[str] | None = None
) -> list[timeline.Interval]:
    """The mount steps' bodies from the hosts' timelines (each a mount of one partition,
    ident "<job>:<partition>"); only those of `job_ids` when given."""
    found = []
    for host in hosts:
        for span in timeline.intervals(client.state, host, "mount"):
            if job_ids is None or span.ident.rsplit(":", 1)[0] in job_ids:
                found.append(span)
    return found


def step_spans(
    record: JobRecord, steps: list[dict[str, Any]], mounts: list[timeline.Interval]
) -> list[tuple[str, float, float]]:
    """(task, start, end) of every step body of one job, from what Redis holds.

    A step record says when the step ended ("at"; "started" too, where the step runner
    records it). Otherwise a step's body starts with the first job state it enters
    (attaching, scanning, ...): the earliest state timestamp after the previous step
    ended; a step that enters no state counts from the previous step's end. Mount
    steps run side by side: their bodies are the host timeline's mount intervals
    (from the mount slot on: narrower than the whole task). Without "started" the
    bodies come out somewhat shorter than the tasks' own timers would say.
    """
    states = sorted(float(t) for t in record.timestamps.values())
    spans: list[tuple[str, float, float]] = []
    previous = float(record.timestamps.get("queued", 0.0))
    timed_mounts = False
    for entry in sorted(steps, key=lambda e: float(e["at"])):
        at = float(entry["at"])
        if "started" in entry:
            spans.append((str(entry["task"]), float(entry["started"]), at))
            timed_mounts |= entry["task"] == MOUNT_TASK
        elif entry["task"] != MOUNT_TASK:
            entered = [t for t in states if previous < t <= at]
            spans.append((str(entry["task"]), min(entered) if entered else previous, at))
        previous = max(previous, at)
    if not timed_mounts:
        spans += [(MOUNT_TASK, span.start, span.end) for span in mounts]
    return spans


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, current_end = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if start > current_end:
            total += end - start
            current_end = end
        elif end > current_end:
            total += end - current_end
            current_end = end
    return total


# --------------------------------------------------------------------------- (b) fleet, one VM

FLEET_PHASES = (
    ("submit -> attach starts", "queued", "attaching"),
    ("attach (launch)", "attaching", "attach done"),
    ("hand-off -> scan", "attach done", "scanning"),
    ("scan (sfdisk + blkid)", "scanning", "mounting"),
    ("mount chord", "mounting", "mounts done"),
    ("chord join -> inspect", "mounts done", "inspecting"),
    ("inspect", "inspecting", "inspect done"),
    ("hand-off -> detach", "inspect done", "detaching"),
    ("detach", "detaching", "done"),
    ("done -> client sees it", "done", "seen"),
)


def fleet_workflow(fleet: Fleet, client: FleetClient, image: str) -> dict[str, Any]:
    """Submit one inspection and wait for it; the shared scan cache is emptied first."""
    cache = redis.Redis.from_url(client.settings.cache_url)
    try:
        cache.flushdb()  # a cold cache, as the library's fresh in-process cache
    finally:
        cache.close()
    before = RedisCounters.read(client.state)
    polls = 0
    started = time.time()
    job = client.submit_inspect(image)
    while True:
        record = client.jobs.get(job)
        polls += 1
        if record.finished:
            break
        if time.time() - started > JOB_TIMEOUT_S:
            raise RuntimeError(f"fleet job {job} still {record.status} after {JOB_TIMEOUT_S} s")
        time.sleep(0.005)
    seen = time.time()
    redis_delta = RedisCounters.read(client.state).since(before)
    if record.status != "done":
        raise RuntimeError(f"fleet job {job} {record.status}: {record.error}")
    steps = client.jobs.steps(job)
    marks = dict(record.timestamps)
    marks["queued"] = started  # the client's own clock, before submit_inspect
    marks["seen"] = seen
    for name, label in (("attach", "attach done"), ("inspect", "inspect done")):
        marks[label] = next(s["at"] for s in steps if s["task"] == f"vmcraft.vm.{name}")
    mounts = [s for s in steps if s["task"] == "vmcraft.vm.mount_partition"]
    marks["mounts done"] = max(s["at"] for s in mounts)
    phases = {label: marks[end] - marks[start] for label, start, end in FLEET_PHASES}
    # Time inside step bodies (step records, timeline) against the wall: the rest is
    # messaging.
    time.sleep(0.05)  # the last step records its end just after the VM is done
    steps = client.jobs.steps(job)
    spans = step_spans(record, steps, mount_spans(client, list(fleet.hosts), {job}))
    intervals = [(start, end) for _task, start, end in spans]
    total = seen - started
    busy = busy_seconds(intervals)
    return {
        "total": total,
        "phases": phases,
        "in_tasks": sum(end - start for start, end in intervals),
        "busy": busy,
        "between_steps": total - busy,
        "tasks": len(steps),
        "mount_tasks": len(mounts),
        "redis_commands": redis_delta.commands - polls,
        "redis_by_command": {
            k: v - polls if k == "hgetall" else v for k, v in redis_delta.by_command.items()
        },
        "client_polls": polls,
        "scan_probes": {k: record.progress.get(k) for k in ("scan_sfdisk", "scan_blkid")},
    }


# --------------------------------------------------------------------------- (c) batch

BATCH_STEPS = ("convert", "attach", "scan", "mount", "inspect", "detach")


def batch_sequential(base: str, root: Path, vms: int) -> dict[str, Any]:
    """The plain loop: per VM convert, then attach, scan, mount all, inspect, shutdown."""
    disks = [overlay(base, root, f"vm{n:02d}") for n in range(vms)]
    out = root / "out"
    out.mkdir()
    settings = CraftSettings(work_dir=str(root / "work"))
    cache = InProcessTTLCache()
    per_vm: list[dict[str, float]] = []
    cpu_before = _own_cpu_s()
    started = time.perf_counter()
    for n, disk in enumerate(disks):
        t0 = time.perf_counter()
        target = str(out / f"vm{n:02d}-disk0.qcow2")
        convert_image(disk, target, target_format="qcow2")
        t1 = time.perf_counter()
        g = VMCraft(target, settings=settings, cache=cache).launch()
        t2 = time.perf_counter()
        try:
            report = g.inspect()
        finally:
            t3 = time.perf_counter()
            g.shutdown()
        t4 = time.perf_counter()
        if [r.distro for r in report.roots] != ["debian"]:
            raise RuntimeError(f"{disk}: unexpected roots {report.roots}")
        steps: dict[str, float] = {"convert": t1 - t0, "attach": t2 - t1, "detach": t4 - t3}
        steps |= {k: v / 1000 for k, v in report.timings_ms.items()}
        per_vm.append(steps)
    elapsed = time.perf_counter() - started
    cpu_after = _own_cpu_s()
    python, tools = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    return {
        "elapsed": elapsed,
        "vms": vms,
        "done": vms,
        "cpu_s": python + tools,
        "cpu_by_process": {"python": python, "tools": tools},
        "per_vm": per_vm,
    }


def write_manifest(root: Path, batch: str, disks: list[str]) -> str:
    path = root / f"{batch}.yaml"
    data = {
        "batch": batch,
        "defaults": {"options": {"fixes": False}},
        "vms": [{"id": Path(d).stem, "disks": [d]} for d in disks],
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def batch_fleet(base: str, root: Path, vms: int, hosts: int) -> dict[str, Any]:
    """A fresh Redis and `hosts` fresh worker hosts; submit the batch, poll until finished."""
    disks = [overlay(base, root, f"vm{n:02d}") for n in range(vms)]
    manifest = write_manifest(root, f"e2e-{hosts}h", disks)
    with redis_server() as server, running_fleet(server, root / "fleet", hosts) as (fleet, client):
        workers_before, client_before = fleet_cpu_s(fleet), _own_cpu_s()[0]
        counters = RedisCounters.read(client.state)
        started = time.time()
        batch = submit_batch(client, manifest)
        polls = 0
        while True:
            status = batch_status(client, batch)
            polls += 1
            if status.finished:
                break
            if time.time() - started > BATCH_TIMEOUT_S:
                raise RuntimeError(f"batch {batch} unfinished after {BATCH_TIMEOUT_S} s")
            time.sleep(0.25)
        seen = time.time()
        cpu = {k: v - workers_before[k] for k, v in fleet_cpu_s(fleet).items()}
        cpu["client"] = _own_cpu_s()[0] - client_before
        redis_delta = RedisCounters.read(client.state).since(counters)
        time.sleep(0.3)  # the last steps record their end just after the VM is marked done
        job_ids = [job_id_for(batch, vm.vm_id) for vm in status.vms]
        records = [client.jobs.get(job_id) for job_id in job_ids]
        mounts = mount_spans(client, list(fleet.hosts), set(job_ids))
        in_tasks: dict[str, float] = {}
        task_runs = 0
        for job_id, record in zip(job_ids, records, strict=True):
            steps = client.jobs.steps(job_id)
            task_runs += len(steps)
            own = [m for m in mounts if m.ident.rsplit(":", 1)[0] == job_id]
            for task, start, end in step_spans(record, steps, own):
                name = task.removeprefix("vmcraft.vm.")
                in_tasks[name] = in_tasks.get(name, 0.0) + end - start
    done = [r for r in records if r.status == "done"]
    if len(done) != vms:
        failed = {r.job_id: r.error for r in records if r.status != "done"}
        raise RuntimeError(f"batch on {hosts} host(s): {len(done)}/{vms} done: {failed}")
    last_done = max(r.timestamps["done"] for r in done)
    per_vm = []
    hosts_used: dict[str, int] = {}
    for r in done:
        timings = step_timings(r.timestamps)
        timings["queue wait"] = r.timestamps["converting"] - r.timestamps["queued"]
        per_vm.append(timings)
        hosts_used[r.host or "?"] = hosts_used.get(r.host or "?", 0) + 1
    return {
        "elapsed": last_done - started,
        "seen": seen - started,
        "vms": vms,
        "done": len(done),
        "hosts_used": hosts_used,
        "cpu_s": sum(cpu.values()) + redis_delta.cpu_s,
        "cpu_by_process": {**cpu, "redis": redis_delta.cpu_s},
        "in_tasks": in_tasks,
        "task_runs": task_runs,
        "redis_commands": redis_delta.commands,
        "status_polls": polls,
        "per_vm": per_vm,
    }


# --------------------------------------------------------------------------- running it all


def _series(name: str, samples: list[float]) -> common.Series:
    return common.Series(name, list(samples))


def _ms_row(label: str, series: common.Series, *extra: Any) -> list[Any]:
    return [label, common.ms(series.median), common.ms(series.low), common.ms(series.high), *extra]


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def single_vm(rounds: int) -> tuple[str, dict[str, Any]]:
    """(a) and (b), alternately, on the 10-partition disk."""
    image = ten_parts_ubuntu_raw().path
    lib_runs: list[tuple[dict[str, float], dict[str, str]]] = []
    fleet_runs: list[dict[str, Any]] = []
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        with running_fleet(server, root / "fleet", 1) as (fleet, client):

            def library() -> float:
                lib_runs.append(library_workflow(image, str(root / "lib")))
                return lib_runs[-1][0]["total"]

            def fleet_job() -> float:
                fleet_runs.append(fleet_workflow(fleet, client, image))
                return float(fleet_runs[-1]["total"])

            library(), fleet_job()  # warm-up: imports, first fork of the pool, page cache
            lib_runs.clear()
            fleet_runs.clear()
            idle = RedisCounters.read(client.state)
            time.sleep(IDLE_WINDOW_S)
            idle_rate = (RedisCounters.read(client.state).commands - idle.commands) / IDLE_WINDOW_S
            series = common.alternate({"library": library, "fleet": fleet_job}, rounds)
    return render_single(series, lib_runs, fleet_runs, idle_rate)


def render_single(
    series: dict[str, common.Series],
    lib_runs: list[tuple[dict[str, float], dict[str, str]]],
    fleet_runs: list[dict[str, Any]],
    idle_rate: float,
) -> tuple[str, dict[str, Any]]:
    steps = {s: _series(s, [t[s] for t, _ in lib_runs]) for s in (*LIBRARY_STEPS, "total")}
    procs = lib_runs[0][1]
    rows = []
    for name in LIBRARY_STEPS:
        before, after = GUIDE_BEFORE.get(name, "-"), GUIDE_AFTER.get(name, "-")
        rows.append([name, before, after, *_ms_row(name, steps[name])[1:], procs[name]])
    total = steps["total"]
    rows.append(["total", GUIDE_BEFORE_TOTAL_S, GUIDE_AFTER_TOTAL_S, *_ms_row("", total)[1:], ""])
    text = common.table(
        f"(a) Library: the guide's 10-partition workflow ({len(total.samples)} runs, "
        "fresh in-process cache each)",
        ["step", "guide before s", "guide after s", "median ms", "min ms", "max ms", "processes"],
        rows,
    )
    text += (
        f"\nTotal {total.median:.3f} s: {GUIDE_AFTER_TOTAL_S / total.median:.0f}x under the "
        f"guide's 30.5 s, {GUIDE_BEFORE_TOTAL_S / total.median:.0f}x under its 203.5 s. "
        f"Target under {LIBRARY_TARGET_S} s: {_met(total.median < LIBRARY_TARGET_S)} "
        f"(max {total.high:.3f} s). 9 of 10 partitions mount (swap does not); 'mount all' "
        "probes each filesystem type (blkid), so blkid x10 afterwards are cache hits.\n\n"
    )
    phases = {
        label: _series(label, [r["phases"][label] for r in fleet_runs])
        for label, *_ in FLEET_PHASES
    }
    fleet_total = series["fleet"]
    busy = _series("busy", [r["busy"] for r in fleet_runs])
    gaps = _series("between", [r["between_steps"] for r in fleet_runs])
    mounts = fleet_runs[0]["mount_tasks"]
    rows = [_ms_row(label, s) for label, s in phases.items()]
    rows.append(_ms_row("total: submit -> client sees done", fleet_total))
    rows.append(_ms_row("  of which a task body was running", busy))
    rows.append(_ms_row("  of which no task was running (messaging)", gaps))
    text += common.table(
        f"(b) Fleet: the same disk, 1 host (concurrency {WORKERS}), {mounts} mount tasks, "
        f"{len(fleet_runs)} runs, cold Redis cache each",
        ["phase", "median ms", "min ms", "max ms"],
        rows,
    )
    redis_cmds = statistics.median(r["redis_commands"] for r in fleet_runs)
    idle_share = idle_rate * fleet_total.median
    commands_seen: dict[str, list[int]] = {}
    for r in fleet_runs:
        for command, calls in r["redis_by_command"].items():
            commands_seen.setdefault(command, []).append(calls)
    top = sorted(commands_seen.items(), key=lambda kv: -statistics.median(kv[1]))[:6]
    top_text = ", ".join(f"{c} {statistics.median(v):.0f}" for c, v in top)
    text += (
        f"\nTotal {fleet_total.median:.3f} s; target under {FLEET_TARGET_S} s: "
        f"{_met(fleet_total.median < FLEET_TARGET_S)} (max {fleet_total.high:.3f} s). "
        f"Fleet / library: {fleet_total.median / total.median:.2f}x. "
        f"{fleet_runs[0]['tasks']} Celery tasks and about {redis_cmds:.0f} Redis commands per "
        f"job, the client's polling excluded; an idle host alone sends {idle_rate:.0f}/s "
        f"(~{idle_share:.0f} of them). Most frequent: {top_text}.\n"
    )
    data = {
        "library": {
            "total": total.to_dict(),
            "steps": {k: v.to_dict() for k, v in steps.items()},
            "processes": procs,
            "guide": {"before_s": GUIDE_BEFORE_TOTAL_S, "after_s": GUIDE_AFTER_TOTAL_S},
            "target_s": LIBRARY_TARGET_S,
        },
        "fleet": {
            "total": fleet_total.to_dict(),
            "phases": {k: v.to_dict() for k, v in phases.items()},
            "busy": busy.to_dict(),
            "between_steps": gaps.to_dict(),
            "target_s": FLEET_TARGET_S,
            "redis_idle_per_s": idle_rate,
            "runs": fleet_runs,
        },
    }
    return text, data


def batch(vms: int, rounds: int) -> tuple[str, dict[str, Any]]:
    """(c) the sequential loop and fleets of 1, 2 and 3 hosts, alternately."""
    base = small_mbr_raw().path
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-batch-") as tmp:
        counter = iter(range(1_000_000))

        def variant(name: str, func: Callable[[Path], dict[str, Any]]) -> Callable[[], float]:
            def sample() -> float:
                root = Path(tmp) / f"sample-{next(counter)}"
                root.mkdir()
                try:
                    result = func(root)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                runs.setdefault(name, []).append(result)
                return float(result["elapsed"])

            return sample

        variants = {SEQUENTIAL: variant(SEQUENTIAL, lambda r: batch_sequential(base, r, vms))}
        for hosts in HOST_COUNTS:
            name = fleet_name(hosts)
            variants[name] = variant(name, functools.partial(_fleet_batch, base, vms, hosts))
        series = common.alternate(variants, rounds)
    return render_batch(vms, series, runs)


def _fleet_batch(base: str, vms: int, hosts: int, root: Path) -> dict[str, Any]:
    return batch_fleet(base, root, vms, hosts)


SEQUENTIAL = "sequential loop (library)"


def fleet_name(hosts: int) -> str:
    return f"fleet, {hosts} host{'s' if hosts > 1 else ''}"


def _median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def render_batch(
    vms: int, series: dict[str, common.Series], runs: dict[str, list[dict[str, Any]]]
) -> tuple[str, dict[str, Any]]:
    seq_rate = vms * 60 / series[SEQUENTIAL].median
    rows = []
    rates = {}
    for name, s in series.items():
        rates[name] = vms * 60 / s.median
        cpu_per_vm = statistics.median(r["cpu_s"] / vms for r in runs[name])
        rows.append(
            [
                name,
                s.median,
                s.low,
                s.high,
                f"{rates[name]:.0f}",
                f"{rates[name] / seq_rate:.2f}x",
                common.ms(cpu_per_vm),
            ]
        )
    two = fleet_name(2)
    speedup = rates[two] / seq_rate
    text = common.table(
        f"(c) Batch of {vms} small VMs (3-partition MBR disk, one qcow2 overlay per VM, "
        f"fixes off), {len(series[SEQUENTIAL].samples)} rounds, workers concurrency {WORKERS}",
        ["variant", "median s", "min s", "max s", "VMs/min", "vs loop", "CPU ms/VM"],
        rows,
    )
    text += (
        f"\nTarget: 2 hosts >= {BATCH_TARGET_SPEEDUP}x the loop's VMs per minute: "
        f"{speedup:.2f}x, {_met(speedup >= BATCH_TARGET_SPEEDUP)}.\n"
        f"This machine has {os.cpu_count()} cores: every simulated host (a Celery main process "
        f"and {WORKERS} pool processes, plus its qemu-img, qemu-nbd and nbdfuse) shares them "
        "with the others and with Redis, so more hosts add processes, not cores. Elapsed is "
        "submit -> last VM done (job timestamps). CPU ms/VM counts the workers, Redis and "
        "the client (the fleet) or this process and its children (the loop).\n\n"
    )
    # Per-VM step times: the loop's own timers, the fleet's job state timestamps.
    steps = ("queue wait", *BATCH_STEPS)
    header = ["step (per VM, median ms)", *series]
    rows = []
    for step in steps:
        row: list[Any] = [step]
        for name in series:
            values = [vm.get(step) for r in runs[name] for vm in r["per_vm"]]
            present = [v for v in values if v is not None]
            row.append(common.ms(statistics.median(present)) if present else "-")
        rows.append(row)
    text += common.table("Per-VM steps", header, rows)
    text += (
        "\nFleet steps run from one job state to the next, so each includes the hand-off "
        "to the next Celery task; 'inspect' includes the (no-op) fix step.\n\n"
    )
    text += render_fleet_profile(vms, runs)
    data = {
        "vms": vms,
        "variants": {name: s.to_dict() for name, s in series.items()},
        "vms_per_min": rates,
        "two_hosts_vs_loop": speedup,
        "target_speedup": BATCH_TARGET_SPEEDUP,
        "runs": {
            name: [{k: v for k, v in r.items() if k != "per_vm"} for r in rs]
            for name, rs in runs.items()
        },
    }
    return text, data


def render_fleet_profile(vms: int, runs: dict[str, list[dict[str, Any]]]) -> str:
    fleets = [fleet_name(h) for h in HOST_COUNTS]
    rows: list[list[Any]] = []
    for proc in CPU_KINDS:
        row: list[Any] = [f"CPU ms/VM: {proc}"]
        for name in fleets:
            row.append(
                common.ms(statistics.median(r["cpu_by_process"][proc] for r in runs[name])) / vms
            )
        rows.append(row)
    tasks = sorted({t for name in fleets for r in runs[name] for t in r["in_tasks"]})
    for task in tasks:
        row = [f"in task ms/VM: {task}"]
        for name in fleets:
            total = statistics.median(r["in_tasks"].get(task, 0.0) for r in runs[name])
            row.append(common.ms(total) / vms)
        rows.append(row)
    rows.append(["Celery task runs/VM", *(_median_of(runs[n], "task_runs") / vms for n in fleets)])
    rows.append(
        [
            "Redis commands/VM",
            *(f"{_median_of(runs[n], 'redis_commands') / vms:.0f}" for n in fleets),
        ]
    )
    loop = {
        kind: statistics.median(r["cpu_by_process"][kind] for r in runs[SEQUENTIAL]) / vms
        for kind in ("python", "tools")
    }
    text = common.table("Where the fleet's time goes (medians over rounds)", ["", *fleets], rows)
    text += (
        f"\nThe loop spends {common.ms(loop['python']):.0f} CPU ms per VM in Python and "
        f"{common.ms(loop['tools']):.0f} in the programs it runs ('tools'). 'in task' is wall "
        "time inside the task bodies (step records and mount timelines in Redis), summed over "
        "the batch's tasks of that "
        "kind and divided by the VMs: with several VMs in flight it includes waiting for a "
        "core.\n"
    )
    return text


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    rounds, vms, batch_rounds = (3, 12, 2) if quick else (7, 50, 2)
    load_before = os.getloadavg()
    text_a, data_a = single_vm(rounds)
    text_c, data_c = batch(vms, batch_rounds)
    load_after = os.getloadavg()
    text = (
        text_a
        + "\n"
        + text_c
        + f"\nLoad average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        "(other work on the machine shows up here).\n"
    )
    data = {
        "quick": quick,
        **data_a,
        "batch": data_c,
        "loadavg": {"before": load_before, "after": load_after},
    }
    return text, data


if __name__ == "__main__":
    text, result = run(quick="--quick" in sys.argv[1:])
    print(text)
    print(f"saved {common.save(NAME, result)}")
