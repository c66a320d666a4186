"""The scan caches against the guide's "Cache Performance Impact" table.

    python -m bench.caching [--quick]

On a GPT disk with 5 ext4 partitions (the bench image of bench/parallel_mounts.py)
it alternates, round after round, three variants of the same calls,
`list_partitions()` x5 then `blkid(dev)` x10 (cycling over the partitions' devices):

  no cache      `use_cache=False` on every call;
  in-process    an `InProcessTTLCache`, fresh for each sample: the first call of each
                key is a miss and is included;
  Redis         a private redis-server: this process fills a fresh namespace by
                scanning (list_partitions + filesystems), then a NEW process attaches
                the same image with `RedisScanCache` and runs the calls, reporting its
                own wall times and subprocess counts as JSON on stdout.

Each sample attaches the disk afresh (outside the timing). Subprocesses are counted
with `commands.add_observer` around the calls. After the calls, the in-process and
Redis samples also time many cached calls (the first one excluded) for the per-call
cost of a hit.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Series, alternate, ms, save, table
from bench.parallel_mounts import gpt_ext4_image, release_leftover_attaches
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import KIND_PARTITIONS, InProcessTTLCache, ScanCache
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.embedded.redis import RedisServer, redis_server
from vmcraft_tasks.rediscache import RedisScanCache

PARTITIONS = 5
LIST_CALLS = 5
BLKID_CALLS = 10
PER_CALL_N, QUICK_PER_CALL_N = 1000, 300
ROUNDS, QUICK_ROUNDS = 7, 3
CHILD_TIMEOUT_S = 120.0
REPO_ROOT = Path(__file__).resolve().parent.parent

NO_CACHE = "no cache"
IN_PROCESS = "in-process"
REDIS = "Redis (other process)"
VARIANTS = (NO_CACHE, IN_PROCESS, REDIS)
OPERATIONS = (("list", f"list_partitions() x{LIST_CALLS}"), ("blkid", f"blkid() x{BLKID_CALLS}"))

# The guide's table: operation -> (without cache, with cache), ms.
GUIDE_MS = {"list": (850.0, 170.0), "blkid": (1200.0, 120.0)}
# Targets for one cached call, ms (stated, not asserted).
TARGET_MS = {IN_PROCESS: 0.1, REDIS: 1.0}


# ------------------------------------------------------------------------- measuring


counting = commands.recorded


def scan_calls(g: VMCraft, use_cache: bool) -> dict[str, Any]:
    """list_partitions() x5, then blkid(dev) x10 over the devices: wall times, commands."""
    with counting() as ran:
        started = time.perf_counter()
        for _ in range(LIST_CALLS):
            parts = g.list_partitions(use_cache=use_cache)
        list_s = time.perf_counter() - started
        list_commands = Counter(ran)
        ran.clear()
        devices = [p.device or "" for p in parts]
        started = time.perf_counter()
        for i in range(BLKID_CALLS):
            g.blkid(devices[i % len(devices)], use_cache=use_cache)
        blkid_s = time.perf_counter() - started
        blkid_commands = Counter(ran)
    if len(devices) != PARTITIONS:
        raise RuntimeError(f"{g.path}: {len(devices)} partitions, expected {PARTITIONS}")
    return {
        "list_s": list_s,
        "blkid_s": blkid_s,
        "list_commands": dict(list_commands),
        "blkid_commands": dict(blkid_commands),
    }


def _per_call_ms(call: Callable[[int], object], calls: int) -> float:
    call(0)  # the first call is excluded (a connection, a script load, a miss)
    started = time.perf_counter()
    for i in range(calls):
        call(i)
    return ms(time.perf_counter() - started) / calls


def per_call_costs(g: VMCraft, calls: int) -> dict[str, Any]:
    """ms per cached list_partitions() and per cached blkid(dev), and commands run."""
    devices = [p.device or "" for p in g.list_partitions()]
    # The cache layer alone for the same lookup (generation + get), to split a hit's cost.
    key = g._key(KIND_PARTITIONS)
    with counting() as ran:
        list_ms = _per_call_ms(lambda _i: g.list_partitions(), calls)
        blkid_ms = _per_call_ms(lambda i: g.blkid(devices[i % len(devices)]), calls)
        get_ms = _per_call_ms(
            lambda _i: (g.cache.generation(g.image.identity), g.cache.get(key, KIND_PARTITIONS)),
            calls,
        )
    return {
        "list_ms": list_ms,
        "blkid_ms": blkid_ms,
        "partitions_lookup_ms": get_ms,
        "calls": calls,
        "commands": len(ran),
    }


def measure(
    image: str, cache: ScanCache, work_dir: str, *, use_cache: bool, per_call: int
) -> dict[str, Any]:
    """Attach (not timed), the scan calls, optionally the per-call costs; always detach."""
    g = VMCraft(image, settings=CraftSettings(work_dir=work_dir), cache=cache)
    try:
        g.launch()
        result = scan_calls(g, use_cache)
        if per_call:
            result["per_call"] = per_call_costs(g, per_call)
        return result
    finally:
        try:
            g.umount_all()
        finally:
            g.shutdown()


# ------------------------------------------------------------------------- Redis variant


def fill_redis(image: str, url: str, namespace: str, work_dir: str) -> None:
    """Process 1: scan the image once through the Redis cache."""
    cache = RedisScanCache.from_url(url, namespace=namespace)
    g = VMCraft(image, settings=CraftSettings(work_dir=work_dir), cache=cache)
    try:
        g.launch()
        g.list_partitions()
        g.filesystems()
    finally:
        try:
            g.shutdown()
        finally:
            cache.close()


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """A fresh interpreter runs the calls against the filled cache; its JSON report."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.caching", "--child", json.dumps(spec)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def child_main(spec: dict[str, Any]) -> None:
    cache = RedisScanCache.from_url(spec["url"], namespace=spec["namespace"])
    try:
        result = measure(
            spec["image"], cache, spec["work_dir"], use_cache=True, per_call=spec["per_call"]
        )
    finally:
        cache.close()
    result["pid"] = os.getpid()
    print(json.dumps(result))


def redis_sample(
    image: str, server: RedisServer, root: Path, round_no: int, per_call: int
) -> dict[str, Any]:
    url = server.url(2)
    namespace = f"vmcraft:bench:caching:{os.getpid()}:{round_no}"
    work_dir = root / f"redis-{round_no}"
    try:
        fill_redis(image, url, namespace, str(work_dir / "filler"))
        child_dir = work_dir / "child"
        spec = {
            "image": image,
            "url": url,
            "namespace": namespace,
            "work_dir": str(child_dir),
            "per_call": per_call,
        }
        try:
            report = run_child(spec)
        finally:
            # A child that died or timed out may have left its attach behind.
            report_leftovers = release_leftover_attaches(child_dir) if child_dir.exists() else []
        report["released_leftovers"] = report_leftovers
        return report
    finally:
        cleanup = RedisScanCache.from_url(url, namespace=namespace)
        try:
            keys = list(cleanup.client.scan_iter(match=f"{namespace}:*"))
            if keys:
                cleanup.client.delete(*keys)
        finally:
            cleanup.close()


# ------------------------------------------------------------------------- report


def _cell(s: Series) -> str:
    return f"{ms(s.median):.2f} [{ms(s.low):.2f}-{ms(s.high):.2f}]"


def _commands(samples: list[dict[str, Any]], key: str) -> str:
    seen = sorted({json.dumps(s[key], sort_keys=True) for s in samples})
    described = []
    for counts in (json.loads(x) for x in seen):
        described.append(", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "0")
    return " or ".join(described)


def series_of(records: dict[str, list[dict[str, Any]]], op: str) -> dict[str, Series]:
    return {
        name: Series(f"{op} {name}", [r[f"{op}_s"] for r in records[name]]) for name in VARIANTS
    }


def main_table(records: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for op, label in OPERATIONS:
        series = series_of(records, op)
        base = series[NO_CACHE].median
        saved = " / ".join(
            f"{100 * (1 - series[n].median / base):.0f}%" for n in (IN_PROCESS, REDIS)
        )
        commands_run = " / ".join(_commands(records[n], f"{op}_commands") for n in VARIANTS)
        guide_without, guide_with = GUIDE_MS[op]
        rows.append(
            [
                label,
                *(_cell(series[n]) for n in VARIANTS),
                commands_run,
                saved,
                f"{guide_without:.0f} ms -> {guide_with:.0f} ms "
                f"({100 * (1 - guide_with / guide_without):.0f}% faster)",
            ]
        )
    header = [
        "operation",
        "without cache ms",
        "in-process ms",
        "Redis (other process) ms",
        "subprocesses run (none / in-process / Redis)",
        "time saved (in-process / Redis)",
        "guide",
    ]
    return table("Scan calls on a fresh attach, median [min-max] ms", header, rows)


def per_call_table(records: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for op, label in (("list", "cached list_partitions()"), ("blkid", "cached blkid(dev)")):
        for name in (IN_PROCESS, REDIS):
            samples = [r["per_call"][f"{op}_ms"] for r in records[name]]
            s = Series(name, samples)
            target = TARGET_MS[name]
            commands_run = sum(r["per_call"]["commands"] for r in records[name])
            lookup = "-"
            if op == "list":
                looked = [r["per_call"]["partitions_lookup_ms"] for r in records[name]]
                lookup = f"{statistics.median(looked):.4f}"
            rows.append(
                [
                    label,
                    name,
                    f"{s.median:.4f} [{s.low:.4f}-{s.high:.4f}]",
                    lookup,
                    f"< {target:g} ms: {'met' if s.median < target else 'NOT met'}",
                    commands_run,
                ]
            )
    calls = records[IN_PROCESS][0]["per_call"]["calls"]
    header = [
        "call",
        "cache",
        "ms per call, median [min-max]",
        "of which cache lookup (generation + get) ms",
        "target",
        "subprocesses run",
    ]
    return table(
        f"Per-call cost of a cache hit ({calls} calls per sample, first call excluded)",
        header,
        rows,
    )


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    load_before = os.getloadavg()
    rounds = QUICK_ROUNDS if quick else ROUNDS
    per_call = QUICK_PER_CALL_N if quick else PER_CALL_N
    image = gpt_ext4_image(PARTITIONS).path
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with (
        redis_server() as server,
        tempfile.TemporaryDirectory(prefix="vmcraft-bench-caching-") as tmp,
    ):
        root = Path(tmp)
        lib_dir = str(root / "lib")
        counter = iter(range(1, 1_000_000))

        def sample(name: str, record: Callable[[], dict[str, Any]]) -> Callable[[], float]:
            def call() -> float:
                result = record()
                records[name].append(result)
                return float(result["list_s"] + result["blkid_s"])

            return call

        variants = {
            NO_CACHE: sample(
                NO_CACHE,
                lambda: measure(image, InProcessTTLCache(), lib_dir, use_cache=False, per_call=0),
            ),
            IN_PROCESS: sample(
                IN_PROCESS,
                lambda: measure(
                    image, InProcessTTLCache(), lib_dir, use_cache=True, per_call=per_call
                ),
            ),
            REDIS: sample(
                REDIS, lambda: redis_sample(image, server, root, next(counter), per_call)
            ),
        }
        try:
            alternate(variants, 1)  # warm-up round (page cache, imports); not recorded
            for samples in records.values():
                samples.clear()
            totals = alternate(variants, rounds)
        finally:
            release_leftover_attaches(root)
    lines = [
        main_table(records),
        per_call_table(records),
        f"{rounds} rounds, alternated; a {PARTITIONS}-partition GPT disk (ext4, 16 MiB each) "
        "attached afresh for every sample; the Redis column is measured by a separate "
        "process reading what this process stored. Load average (1 min) before/after: "
        f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}.\n",
    ]
    data = {
        "rounds": rounds,
        "partitions": PARTITIONS,
        "guide_ms": {op: {"without": w, "with": c} for op, (w, c) in GUIDE_MS.items()},
        "targets_ms_per_cached_call": TARGET_MS,
        "series": {
            op: {name: s.to_dict() for name, s in series_of(records, op).items()}
            for op, _ in OPERATIONS
        },
        "totals": {name: s.to_dict() for name, s in totals.items()},
        "samples": records,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    return "\n".join(lines), data


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    else:
        quick_run = "--quick" in sys.argv[1:]
        text, result = run(quick=quick_run)
        print(text)
        # A quick run never overwrites the full run's results.
        print(f"saved {save('caching_quick' if quick_run else 'caching', result)}")
