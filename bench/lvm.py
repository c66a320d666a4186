"""LVM guests: a 10-LV Rocky guest end to end against the 10-partition Ubuntu guest, and
the NBD segment mapper against a loop device on one LV, side by side in one run.

    .venv/bin/python -m bench.lvm [--quick]        (or: python -m bench lvm)

(a) End to end through the library: `GuestVM([disk]).launch(); inspect(); shutdown()`
    on `ten_lvs` (GPT: BIOS boot, /boot, one PV with ten LVs, eight of them one
    segment -> loop devices, two of them two segments -> nbdkit) and on
    `ten_parts_ubuntu_raw` (ten GPT partitions, nine filesystems), alternately, a fresh
    in-process scan cache each run. Phases: attach (launch), then inspect's own timers
    (scan, mount, inspect), release (shutdown); the programs each phase started.
(b) One single-segment LV (`var`, xfs, 300 MiB) exposed by `expose_loop` and by
    `expose_nbd` (nbdkit + segment plugin + nbdfuse + loop), and for reference the
    two-segment `root` (ext4, 64 MiB) through nbdkit, alternately. Per sample: expose,
    mount (the library's mount ladder) and unmount, a sequential O_DIRECT read of N MiB
    in 1 MiB requests, release; then a second exposure for COUNT random 4 KiB O_DIRECT
    reads (each in its own 64 KiB slot, one fixed set of offsets), release. The reads
    stay in a 64 MiB region: var's data file (one extent, where the recipe's notes say;
    data, not holes) and the whole of root (across both segments).

Why two exposures per sample: O_DIRECT bypasses the loop device's cache but not the
page cache of the FUSE file behind it (the loop device reads its backing file
buffered), so a range read twice in one exposure comes back from memory. FUSE drops a
file's cached pages whenever it is opened again, which every fresh exposure does; the
bench opens the disk's FUSE file once, untimed, before each exposure so that this
invalidation (tens of ms after a large read) is charged to no variant. No system-wide
cache is dropped; the raw image files stay in the host's page cache throughout.

Everything runs in one private temporary directory; at the end no loop device, mount,
helper process or attach state of it may remain (checked, and reported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.attach_retry import leftovers, nothing_leaked, reap_exited_children
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.guestvm import GuestVM, VMReport
from vmcraft_tasks.craft.lvm import expose, layout, tools
from vmcraft_tasks.craft.lvm.expose import ExposedLV, PVLocation
from vmcraft_tasks.craft.mount.tracker import MountTracker
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft, mount_block_device
from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples.recipes.ten_lvs import ten_lvs
from vmcraft_tasks.samples.recipes.ten_parts_ubuntu import ten_parts_ubuntu_raw
from vmcraft_tasks.samples.toolkit import BuiltImage, remove_if_unmounted

NAME = "lvm"
MiB = 1 << 20
BLOCK = 4096
SLOT = 64 * 1024  # one random read per slot: readahead of one never serves another
SEED = 20261201
LVM_PV_TYPE = "E6D6D379-F507-44C2-A23C-238F2A3DF928"


@dataclasses.dataclass(frozen=True)
class Mode:
    guest_rounds: int
    lv_rounds: int
    seq_mib: int
    random_reads: int


# Reads stay inside a 64 MiB region of each LV: var's data file, all of root.
REGION = 64 * MiB
FULL = Mode(guest_rounds=21, lv_rounds=21, seq_mib=64, random_reads=1000)
QUICK = Mode(guest_rounds=3, lv_rounds=3, seq_mib=32, random_reads=300)


def _cell(series: common.Series, scale: float = 1.0, digits: int = 1) -> str:
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(series.median * scale)} "
        f"[{f.format(series.low * scale)}-{f.format(series.high * scale)}]"
    )


def describe_processes(names: Sequence[str]) -> str:
    counts = Counter(names)
    return " ".join(f"{n}x{name}" for name, n in sorted(counts.items())) or "-"


# --------------------------------------------------------------------------- (a) end to end

PHASES = ("attach", "scan", "mount", "inspect", "release")
LVM_GUEST = "10 LVs (ten_lvs)"
PART_GUEST = "10 partitions (ten_parts_ubuntu)"


def guest_run(paths: list[str], work_dir: str) -> tuple[dict[str, float], dict[str, str], VMReport]:
    """launch(); inspect(); shutdown(), each phase timed, the programs of each counted."""
    vm = GuestVM(paths, settings=CraftSettings(work_dir=work_dir), cache=InProcessTTLCache())
    started: list[tuple[float, str]] = []
    stop = commands.add_observer(
        lambda argv: started.append((time.perf_counter(), os.path.basename(argv[0])))
    )
    try:
        t0 = time.perf_counter()
        try:
            vm.launch()
            t1 = time.perf_counter()
            report = vm.inspect()
            t2 = time.perf_counter()
        finally:
            t_release = time.perf_counter()
            vm.shutdown()
            t3 = time.perf_counter()
    finally:
        stop()
    timers = report.timings_ms
    times = {
        "attach": t1 - t0,
        "scan": timers["scan"] / 1000,
        "mount": timers["mount"] / 1000,
        "inspect": timers["inspect"] / 1000,
        "release": t3 - t_release,
        "total": t3 - t0,
    }
    # Phase boundaries on one clock: inspect() runs scan, mount, inspect in that order.
    ends = [t1, t1 + times["scan"], t1 + times["scan"] + times["mount"], t2, t3]
    procs = {}
    for phase, low, high in zip(PHASES, [t0, *ends[:-1]], ends, strict=True):
        procs[phase] = describe_processes([n for at, n in started if low <= at < high])
    return times, procs, report


def check_lvm_guest(report: VMReport, built: BuiltImage) -> None:
    methods = Counter(lv.method for lv in report.lvs)
    mounted = sum(1 for m in report.mounts.values() if m.ok)
    roots = [(r.distro, r.hostname) for r in report.roots]
    if methods != {"loop": 8, "nbdkit": 2} or mounted != 11:
        raise RuntimeError(f"ten_lvs: LVs exposed {dict(methods)}, {mounted} of 11 mounted")
    if roots != [("rocky", built.notes["hostname"])]:
        raise RuntimeError(f"ten_lvs: roots {roots}")


def check_part_guest(report: VMReport) -> None:
    mounted = sum(1 for m in report.mounts.values() if m.ok)
    roots = [r.distro for r in report.roots]
    if mounted != 9 or roots != ["ubuntu"] or report.lvs:
        raise RuntimeError(f"ten_parts_ubuntu: {mounted} of 9 mounted, roots {roots}")


def end_to_end(root: Path, rounds: int) -> tuple[str, dict[str, Any]]:
    lvm_built, part_built = ten_lvs(), ten_parts_ubuntu_raw()
    runs: dict[str, list[tuple[dict[str, float], dict[str, str]]]] = {
        LVM_GUEST: [],
        PART_GUEST: [],
    }

    def lvm_guest() -> float:
        times, procs, report = guest_run(lvmkit.disk_paths(lvm_built), str(root / "a"))
        check_lvm_guest(report, lvm_built)
        runs[LVM_GUEST].append((times, procs))
        return times["total"]

    def part_guest() -> float:
        times, procs, report = guest_run([part_built.path], str(root / "a"))
        check_part_guest(report)
        runs[PART_GUEST].append((times, procs))
        return times["total"]

    lvm_guest(), part_guest()  # warm-up: imports, nbdkit's Python, the images' pages
    for kept in runs.values():
        kept.clear()
    common.alternate({LVM_GUEST: lvm_guest, PART_GUEST: part_guest}, rounds)
    series = {
        guest: {
            phase: common.Series(phase, [t[phase] for t, _ in kept]) for phase in (*PHASES, "total")
        }
        for guest, kept in runs.items()
    }
    rows = []
    for phase in (*PHASES, "total"):
        lvm_s, part_s = series[LVM_GUEST][phase], series[PART_GUEST][phase]
        rows.append(
            [
                phase,
                _cell(lvm_s, 1000),
                _cell(part_s, 1000),
                f"{lvm_s.median / part_s.median:.2f}x",
            ]
        )
    text = common.table(
        f"(a) End to end: GuestVM launch / inspect / shutdown, {rounds} rounds alternated, "
        "ms median [min-max]",
        ["phase", LVM_GUEST, PART_GUEST, "LVs / partitions"],
        rows,
    )
    proc_rows = [
        [phase, runs[LVM_GUEST][0][1][phase], runs[PART_GUEST][0][1][phase]] for phase in PHASES
    ]
    text += "\n" + common.table(
        "Programs started per phase (first round)", ["phase", LVM_GUEST, PART_GUEST], proc_rows
    )
    text += (
        "\nThe LVM guest mounts 11 filesystems (/boot and its ten LVs: 8 ext4, 2 xfs), the "
        "partitioned guest 9 (ext4; its swap is not mounted). Its scan includes reading the "
        "VG with lvm2 (private config) and exposing the ten LVs: 8 loop devices, 2 nbdkit "
        "segment mappers; release stops those before detaching the disk.\n"
    )
    data = {
        guest: {phase: s.to_dict() for phase, s in by_phase.items()}
        for guest, by_phase in series.items()
    }
    data["processes"] = {guest: kept[0][1] for guest, kept in runs.items()}
    return text, data


# --------------------------------------------------------------------------- (b) one LV


@dataclasses.dataclass(frozen=True)
class Reads:
    seconds: float  # time inside the read calls only
    latencies_us: list[float]
    digest: str


def read_direct(device: str, offsets: Sequence[int], size: int) -> Reads:
    """pread `size` bytes at each offset with O_DIRECT (page-aligned buffer), one at a
    time; only the reads are timed, the digest of what came back is taken between them."""
    digest = hashlib.sha256()
    latencies = []
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    try:
        for offset in offsets:
            started = time.perf_counter_ns()
            got = os.preadv(fd, [buf], offset)
            latencies.append((time.perf_counter_ns() - started) / 1000)
            if got != size:
                raise RuntimeError(f"{device}: short read at {offset}: {got} of {size}")
            digest.update(buf)
    finally:
        buf.close()
        os.close(fd)
    return Reads(sum(latencies) / 1e6, latencies, digest.hexdigest())


@dataclasses.dataclass
class LVTarget:
    label: str
    lv: layout.LV
    fstype: str
    exposer: Callable[..., ExposedLV]
    region: int  # byte offset in the LV of the REGION the reads stay in


class AttachedPV:
    """The LVM guest's disk attached by the library, its VG read with lvm2's tools."""

    def __init__(self, built: BuiltImage, root: Path) -> None:
        self.root = root
        self.g = VMCraft(
            built.path, settings=CraftSettings(work_dir=str(root / "b")), cache=InProcessTTLCache()
        )
        self.parent = str(root / "lvs")
        self.mnt = root / "mnt"

    def __enter__(self) -> AttachedPV:
        self.g.launch()
        os.makedirs(self.parent)
        pv = next(p for p in self.g.list_partitions() if p.type.upper() == LVM_PV_TYPE)
        self.pv_device = self.g.device(pv.number)
        (self.vg,) = self.read_vg()
        self.where = {p.uuid: PVLocation(self.g.disk_device, pv.offset_bytes) for p in self.vg.pvs}
        return self

    def read_vg(self) -> tuple[layout.VG, ...]:
        return layout.parse(tools.report([self.pv_device]))

    def __exit__(self, *exc: object) -> None:
        try:
            expose.release_all(self.parent)
        finally:
            self.g.shutdown()

    def settle(self) -> None:
        """Open the disk's FUSE file once (untimed): FUSE drops its cached pages."""
        os.close(os.open(self.g.disk_device, os.O_RDONLY))

    def exposed(self, target: LVTarget) -> tuple[ExposedLV, float]:
        self.settle()
        started = time.perf_counter()
        e = target.exposer(self.vg, target.lv, self.parent, locations=self.where)
        return e, time.perf_counter() - started

    def released(self, e: ExposedLV) -> float:
        started = time.perf_counter()
        expose.release(e.state_dir)
        return time.perf_counter() - started


def lv_sample(pv: AttachedPV, target: LVTarget, mode: Mode, offsets: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"expose": [], "release": []}
    e, took = pv.exposed(target)
    out["expose"].append(took)
    try:
        tracker = MountTracker()
        mountpoint = pv.mnt / target.lv.name
        mountpoint.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = mount_block_device(
            e.device, str(mountpoint), target.fstype, readonly=True, tracker=tracker
        )
        out["mount"] = time.perf_counter() - started
        started = time.perf_counter()
        failed = tracker.umount_all()
        out["umount"] = time.perf_counter() - started
        if not result.ok or failed:
            raise RuntimeError(f"{target.label}: mount {result.error or ''} umount {failed}")
        start = target.region
        seq = read_direct(e.device, range(start, start + mode.seq_mib * MiB, MiB), MiB)
        out["seq"], out["seq_digest"] = seq.seconds, seq.digest
    finally:
        out["release"].append(pv.released(e))
    e, took = pv.exposed(target)
    out["expose"].append(took)
    try:
        rand = read_direct(e.device, offsets, BLOCK)
    finally:
        out["release"].append(pv.released(e))
    out["random"], out["random_digest"] = rand.seconds, rand.digest
    out["p50_us"] = statistics.median(rand.latencies_us)
    out["p99_us"] = statistics.quantiles(rand.latencies_us, n=100)[98]
    out["method"] = e.method
    return out


LOOP, NBD, NBD_MULTI = "loop", "nbdkit", "nbdkit, 2 segments"


def one_lv(root: Path, mode: Mode) -> tuple[str, dict[str, Any]]:
    built = ten_lvs()
    samples: dict[str, list[dict[str, Any]]] = {LOOP: [], NBD: [], NBD_MULTI: []}
    report_s: list[float] = []
    with AttachedPV(built, root) as pv:
        var, lv_root = pv.vg.lv("var"), pv.vg.lv("root")
        if var.multi_segment or not lv_root.multi_segment:
            raise RuntimeError("ten_lvs: var must be one segment, root two")
        data = built.notes["var_data"]  # one extent of real data, not holes
        if data["length"] < REGION or lv_root.size != REGION:
            raise RuntimeError(f"ten_lvs: var's data {data}, root {lv_root.size} bytes")
        at = int(data["lv_offset"])
        targets = {
            LOOP: LVTarget("var via expose_loop", var, "xfs", expose.expose_loop, at),
            NBD: LVTarget("var via expose_nbd", var, "xfs", expose.expose_nbd, at),
            NBD_MULTI: LVTarget("root via expose_nbd", lv_root, "ext4", expose.expose_nbd, 0),
        }
        slots = random.Random(SEED).sample(range(REGION // SLOT), mode.random_reads)
        offsets = {name: [t.region + s * SLOT for s in slots] for name, t in targets.items()}

        def variant(name: str) -> Callable[[], float]:
            def sample() -> float:
                samples[name].append(lv_sample(pv, targets[name], mode, offsets[name]))
                return float(samples[name][-1]["seq"])

            return sample

        for name, kept in samples.items():  # warm-up: nbdkit's Python, the image's pages
            variant(name)()
            kept.clear()

        def read_vg() -> float:
            report_s.append(common.timed(pv.read_vg))
            return report_s[-1]

        variants = {name: variant(name) for name in samples} | {"lvm report": read_vg}
        common.alternate(variants, mode.lv_rounds)
    if mode.seq_mib * MiB == data["length"]:  # the whole data file: its bytes, no other
        digests = {s["seq_digest"] for s in samples[LOOP] + samples[NBD]}
        if digests != {data["sha256"]}:
            raise RuntimeError(f"var's data file read back wrong: {digests}")
    return render_one_lv(mode, samples, report_s)


def render_one_lv(
    mode: Mode, samples: dict[str, list[dict[str, Any]]], report_s: list[float]
) -> tuple[str, dict[str, Any]]:
    for a, b in zip(samples[LOOP], samples[NBD], strict=True):
        if (a["seq_digest"], a["random_digest"]) != (b["seq_digest"], b["random_digest"]):
            raise RuntimeError("var read through the loop device and through nbdkit differ")
    methods = {name: {s["method"] for s in runs} for name, runs in samples.items()}
    if methods != {LOOP: {"loop"}, NBD: {"nbdkit"}, NBD_MULTI: {"nbdkit"}}:
        raise RuntimeError(f"unexpected methods: {methods}")

    def series(name: str, key: str, per: Callable[[Any], float] = float) -> common.Series:
        values: list[float] = []
        for s in samples[name]:
            value = s[key]
            values += [per(v) for v in value] if isinstance(value, list) else [per(value)]
        return common.Series(f"{name} {key}", values)

    seq_mib = mode.seq_mib
    count = mode.random_reads
    measures: list[tuple[str, str, Callable[[str], common.Series], float, int]] = [
        ("expose", "ms", lambda n: series(n, "expose"), 1000, 1),
        ("mount (mount ladder)", "ms", lambda n: series(n, "mount"), 1000, 1),
        ("unmount", "ms", lambda n: series(n, "umount"), 1000, 1),
        (
            f"sequential read {seq_mib} MiB, 1 MiB O_DIRECT",
            "MiB/s",
            lambda n: series(n, "seq", lambda s: seq_mib / s),
            1,
            0,
        ),
        (
            f"random 4 KiB O_DIRECT x{count}",
            "IOPS",
            lambda n: series(n, "random", lambda s: count / s),
            1,
            0,
        ),
        ("random 4 KiB latency p50", "us", lambda n: series(n, "p50_us"), 1, 0),
        ("random 4 KiB latency p99", "us", lambda n: series(n, "p99_us"), 1, 0),
        ("release", "ms", lambda n: series(n, "release"), 1000, 1),
    ]
    rows = []
    data: dict[str, Any] = {
        "mode": dataclasses.asdict(mode),
        "lvm_report": common.Series("lvm report", report_s).to_dict(),
    }
    for label, unit, get, scale, digits in measures:
        loop, nbd, multi = get(LOOP), get(NBD), get(NBD_MULTI)
        rows.append(
            [
                f"{label} ({unit})",
                _cell(loop, scale, digits),
                _cell(nbd, scale, digits),
                f"{nbd.median / loop.median:.2f}x",
                _cell(multi, scale, digits),
            ]
        )
        data[label] = {LOOP: loop.to_dict(), NBD: nbd.to_dict(), NBD_MULTI: multi.to_dict()}
    rounds = len(samples[LOOP])
    text = common.table(
        f"(b) One LV: the segment mapper against a loop device, {rounds} rounds alternated, "
        "median [min-max]",
        [
            "measure",
            "var (xfs, 1 segment): loop",
            "var: nbdkit",
            "nbdkit / loop",
            "root (ext4, 2 segments): nbdkit",
        ],
        rows,
    )
    reads = common.Series("lvm report", report_s)
    text += (
        f"\nReading the VG (one `lvm` report, private config): {_cell(reads, 1000)} ms. "
        "Expose and release are two samples per round (one exposure for mount and the "
        "sequential read, a fresh one for the random reads). Reads are one at a time "
        "(queue depth 1); the same offsets for both methods, whose bytes are compared "
        "(identical). 'nbdkit / loop' is the ratio of the medians.\n"
    )
    return text, data


# --------------------------------------------------------------------------- running it all


def tool_versions() -> dict[str, str]:
    out = {}
    for name, argv in (
        ("nbdkit", ["nbdkit", "--version"]),
        ("nbdfuse", ["nbdfuse", "--version"]),
        ("qemu-nbd", ["qemu-nbd", "--version"]),
        ("lvm", ["lvm", "version"]),
    ):
        result = commands.run(argv, timeout=30, check=False)
        out[name] = (result.stdout or result.stderr).strip().splitlines()[0]
    return out


@contextlib.contextmanager
def private_root() -> Iterator[Path]:
    """A fresh temporary directory, removed after unless something is mounted inside."""
    root = Path(tempfile.mkdtemp(prefix="bench-lvm-"))
    try:
        yield root
    finally:
        remove_if_unmounted(root)


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    mode = QUICK if quick else FULL
    ten_lvs(), ten_parts_ubuntu_raw()  # built (and cached) before anything is timed
    load_before = os.getloadavg()
    with private_root() as root:
        try:
            text_a, data_a = end_to_end(root, mode.guest_rounds)
            text_b, data_b = one_lv(root, mode)
        finally:
            reaped = reap_exited_children()
            leaks = leftovers(str(root))
    load_after = os.getloadavg()
    versions = tool_versions()
    text = (
        text_a
        + "\n"
        + text_b
        + "\nTools: "
        + "; ".join(versions.values())
        + f". Load average before {load_before[0]:.2f}, after {load_after[0]:.2f}. "
        + "Left behind: "
        + ("nothing" if nothing_leaked(leaks) else f"LEFTOVERS {leaks}")
        + ".\n"
    )
    data = {
        "quick": quick,
        "end_to_end": data_a,
        "one_lv": data_b,
        "tools": versions,
        "loadavg": {"before": load_before, "after": load_after},
        "leaks": leaks,
        "reaped": reaped,
    }
    return text, data


if __name__ == "__main__":
    text, result = run(quick="--quick" in sys.argv[1:])
    print(text)
    print(f"saved {common.save(NAME, result)}")
