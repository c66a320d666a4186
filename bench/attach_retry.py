"""NBD attach retry under injected transient failures: the guide's retry table, measured.

    .venv/bin/python -m bench.attach_retry [--quick]

Attaches a small qcow2 image 1000 times per scenario (100 with --quick) through the
FUSE backend (qemu-nbd + nbdfuse) and shuts it down again after every success.
Failures are injected at the process layer, where they happen in production: a
FAKE `qemu-nbd` or `nbdfuse` wrapper script is put first on PATH; it draws a number
for every start it sees and either fails with a transient message, sleeps so the
socket appears late, or execs the real program.

The draw is a 32-bit integer hash (murmur3's finaliser) of a seed passed in an
environment variable and a per-scenario start counter kept in a file, so a run is
reproducible: the same seed injects the same faults into the same starts. Every
decision is logged, and the log is checked against the same hash computed here.

Retry policy: RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05), i.e. tenacity's
full-jitter exponential wait, uniform in [0, min(0.05, 0.01 * 2**(n-1))] s after the
n-th failure: at most 10 ms after the first, 20 ms after the second. The library
default (base 0.1 s, cap 2 s) would only add waiting time, not change outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.common import save, table
from vmcraft_tasks.craft.cache import InProcessTTLCache
from vmcraft_tasks.craft.errors import AttachError, TransientAttachError
from vmcraft_tasks.craft.nbd.fuse import FuseNbdBackend
from vmcraft_tasks.craft.retry import RetryPolicy
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft

ATTACHES = 1000
QUICK_ATTACHES = 100
SEED = 20250101
SEED_ENV = "VMCRAFT_BENCH_FAKE_SEED"
POLICY = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05)
DEFAULT_START_TIMEOUT_S = 10.0
SLOW_START_TIMEOUT_S = 0.2
SLOW_SLEEP_MS = 400  # well past SLOW_START_TIMEOUT_S: the backend gives up first
LATE_SLEEP_MAX_MS = 20  # late but in time: the socket appears within the timeout
PER_MILLION = 1_000_000

QEMU_NBD_TRANSIENT = "qemu-nbd: Failed to bind socket: Address already in use"
NBDFUSE_TRANSIENT = "nbdfuse: nbd_connect_unix: recv: Connection reset by peer"

# The guide's "Retry Statistics (1000 tests)": attempt 1, 2, 3, total success (%).
GUIDE_ROWS: dict[str, tuple[float, float, float, float]] = {
    "Normal conditions": (98.2, 1.5, 0.2, 99.9),
    "High load": (87.3, 10.1, 2.1, 99.5),
    "Module load delay": (72.5, 22.3, 4.8, 99.6),
}
TARGET_TOTAL_PCT = 99.9
TARGET_FAULT_RATE = 0.10


@dataclass(frozen=True)
class Scenario:
    name: str
    program: str  # the helper the fake wraps: "qemu-nbd" or "nbdfuse"
    mode: str  # "fail": exit 1 with `message`; "slow": sleep before exec'ing the real one
    per_million: int  # chance of a fault per start of `program`
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    message: str = ""
    guide_row: str | None = None

    @property
    def fault_rate(self) -> float:
        return self.per_million / PER_MILLION


SCENARIOS = (
    Scenario(
        "normal",
        "qemu-nbd",
        "fail",
        20_000,
        message=QEMU_NBD_TRANSIENT,
        guide_row="Normal conditions",
    ),
    Scenario(
        "high load", "qemu-nbd", "fail", 100_000, message=QEMU_NBD_TRANSIENT, guide_row="High load"
    ),
    # A quarter of starts sleep past the start timeout: about the guide's first-attempt
    # failure rate for "Module load delay" (27.5 %), the nearest it has to a late socket.
    Scenario(
        "slow socket",
        "qemu-nbd",
        "slow",
        250_000,
        start_timeout_s=SLOW_START_TIMEOUT_S,
        guide_row="Module load delay",
    ),
    Scenario("nbdfuse failing", "nbdfuse", "fail", 100_000, message=NBDFUSE_TRANSIENT),
)


# --------------------------------------------------------------------------- the fakes

_MASK32 = 0xFFFFFFFF

# The same arithmetic as the wrapper's bash, so the bench can check the fakes' log.
_HASH_BASH = """\
h=$(( (seed * 2654435761 + n * 40503 + 12345) & 0xFFFFFFFF ))
h=$(( ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF ))
h=$(( ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF ))
h=$(( h ^ (h >> 16) ))
draw=$(( h % 1000000 ))
"""


def fake_hash(seed: int, n: int) -> int:
    """The wrapper's per-start hash of (seed, start number) (pure)."""
    h = (seed * 2654435761 + n * 40503 + 12345) & _MASK32
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & _MASK32
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def fake_verdict(scenario: Scenario, seed: int, n: int) -> str:
    """What the wrapper decides for its n-th start: "fail", "slow" or "ok" (pure)."""
    if fake_hash(seed, n) % PER_MILLION < scenario.per_million:
        return "fail" if scenario.mode == "fail" else "slow"
    return "ok"


def fake_script(scenario: Scenario, real: str, counter: str, log_path: str) -> str:
    """A bash wrapper that injects `scenario`'s faults, then execs `real`."""
    head = (
        "#!/bin/bash\n"
        f"# FAKE {scenario.program} written by bench/attach_retry.py: NOT the real tool.\n"
        f"# Injects transient faults ({scenario.mode}, {scenario.per_million} per million\n"
        f"# starts) with a seeded per-start draw, else execs {real}.\n"
        "set -u\n"
        f'seed="${{{SEED_ENV}:?}}"\n'
        f'read -r n < "{counter}"; n=$(( n + 1 )); echo "$n" > "{counter}"\n' + _HASH_BASH
    )
    if scenario.mode == "fail":
        body = (
            f"if (( draw < {scenario.per_million} )); then\n"
            f'  echo "$n $draw fail" >> "{log_path}"\n'
            f'  echo "{scenario.message}" >&2\n'
            "  exit 1\n"
            "fi\n"
            f'echo "$n $draw ok" >> "{log_path}"\n'
        )
    else:
        body = (
            f"if (( draw < {scenario.per_million} )); then\n"
            f"  verdict=slow; delay_ms={SLOW_SLEEP_MS}\n"
            "else\n"
            f"  verdict=ok; delay_ms=$(( (h >> 8) % {LATE_SLEEP_MAX_MS} ))\n"
            "fi\n"
            f'echo "$n $draw $verdict $delay_ms" >> "{log_path}"\n'
            "if (( delay_ms > 0 )); then\n"
            # Interruptible: the backend's SIGTERM on timeout ends the sleep with us.
            '  trap \'kill "$sp" 2>/dev/null; wait "$sp"; exit 143\' TERM\n'
            '  printf -v secs "%d.%03d" $(( delay_ms / 1000 )) $(( delay_ms % 1000 ))\n'
            '  sleep "$secs" & sp=$!\n'
            '  wait "$sp"\n'
            "  trap - TERM\n"
            "fi\n"
        )
    return head + body + f'exec {real} "$@"\n'


@dataclass(frozen=True)
class Fake:
    """One scenario's installed fake: its directory for PATH, counter and decision log."""

    scenario: Scenario
    bindir: str
    script: str
    counter: str
    log_path: str
    seed: int


def install_fake(scenario: Scenario, root: str, seed: int, real: str) -> Fake:
    slug = scenario.name.replace(" ", "-")
    bindir = os.path.join(root, f"fakebin-{slug}")
    os.makedirs(bindir, exist_ok=True)
    counter = os.path.join(root, f"{slug}.starts")
    log_path = os.path.join(root, f"{slug}.decisions")
    with open(counter, "w") as fh:
        fh.write("0\n")
    open(log_path, "w").close()
    script = os.path.join(bindir, scenario.program)
    with open(script, "w") as fh:
        fh.write(fake_script(scenario, real, counter, log_path))
    os.chmod(script, 0o755)
    return Fake(scenario, bindir, script, counter, log_path, seed)


@contextlib.contextmanager
def fake_first_on_path(fake: Fake) -> Iterator[None]:
    """PATH and seed for one attach of `fake`'s scenario; restored afterwards."""
    saved = {key: os.environ.get(key) for key in ("PATH", SEED_ENV)}
    os.environ["PATH"] = f"{fake.bindir}{os.pathsep}{saved['PATH'] or ''}"
    os.environ[SEED_ENV] = str(fake.seed)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- leak check


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def leftovers(root: str) -> dict[str, list[str]]:
    """Anything still alive that belongs to `root`: loop devices backed by files under
    it, mounts under it, processes naming it (or unreaped children of ours), files.

    Shared with bench/mount_fallback.py. Empty lists mean nothing leaked.
    """
    prefix = root.rstrip("/") + "/"
    loops = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            backing = _read(f"/sys/block/{name}/loop/backing_file").strip()
            if backing.startswith(prefix):
                loops.append(f"/dev/{name} -> {backing}")
    mounts = []
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        source = fields[fields.index("-") + 2] if "-" in fields else ""
        if fields[4].startswith(prefix) or source.startswith(prefix):
            mounts.append(f"{source} on {fields[4]}")
    processes = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        stat = _read(f"/proc/{entry}/stat")
        try:
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        except (IndexError, ValueError):
            continue
        args = _read(f"/proc/{entry}/cmdline").split("\0")
        ours = any(prefix in arg or arg == root for arg in args)
        if ours or (int(ppid) == me and state == "Z"):
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            processes.append(f"{entry} {name} state={state}: {' '.join(args).strip()}")
    files = []
    for dirpath, dirnames, _files in os.walk(root):
        if os.path.basename(dirpath).startswith("attach-"):
            files.append(dirpath)
        # Never walk into a (leaked) mount.
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
    return {"loop_devices": loops, "mounts": mounts, "processes": processes, "state_dirs": files}


def reap_exited_children(timeout_s: float = 2.0) -> list[str]:
    """Collect helpers of ours that have exited but were never waited for.

    The library's `wait_gone` counts a zombie as gone; a multi-threaded helper
    (qemu-nbd, nbdfuse) shows as a zombie while its other threads still exit, before
    it can be waited for, so its exit status is collected only when Python next
    spawns a process. Waiting for our own exited children by pid ends that here.
    """
    me = os.getpid()
    reaped: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        zombies = []
        for entry in os.listdir("/proc"):
            stat = _read(f"/proc/{entry}/stat") if entry.isdigit() else ""
            with contextlib.suppress(IndexError, ValueError):
                state, ppid = stat.rsplit(")", 1)[1].split()[:2]
                if int(ppid) == me and state == "Z":
                    zombies.append((int(entry), stat.split("(", 1)[1].rsplit(")", 1)[0]))
        for pid, name in zombies:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(f"{pid} {name}")
        if not zombies or time.monotonic() >= deadline:
            return reaped
        time.sleep(0.02)


def nothing_leaked(report: dict[str, list[str]]) -> bool:
    return not any(report.values())


# --------------------------------------------------------------------------- the run


@dataclass
class Attach:
    ok: bool
    attempts: int
    attach_s: float
    shutdown_s: float
    error: str = ""


def attach_once(image: str, settings: CraftSettings, backend: FuseNbdBackend) -> Attach:
    g = VMCraft(image, settings=settings, cache=InProcessTTLCache(), backend=backend)
    started = time.perf_counter()
    try:
        g.launch()
    except TransientAttachError as exc:
        return Attach(False, exc.attempts, time.perf_counter() - started, 0.0, exc.reason)
    except AttachError as exc:  # permanent: not retried (should not happen here)
        return Attach(False, exc.attempts, time.perf_counter() - started, 0.0, f"permanent: {exc}")
    attach_s = time.perf_counter() - started
    attempts = g.attach_attempts
    started = time.perf_counter()
    g.shutdown()
    return Attach(True, attempts, attach_s, time.perf_counter() - started)


def model(p: float, attempts: int) -> list[float]:
    """Independent faults with probability p per start: % succeeding on each attempt,
    then % total (pure)."""
    shares = [100.0 * p ** (k - 1) * (1 - p) for k in range(1, attempts + 1)]
    return [*shares, sum(shares)]


def _pct(count: int, total: int) -> float:
    return 100.0 * count / total if total else 0.0


def _ms_median(values: list[float]) -> float | None:
    return statistics.median(values) * 1000.0 if values else None


def run_scenarios(image: str, root: str, attaches: int) -> list[dict[str, Any]]:
    """Attach `attaches` times per scenario, scenarios in turn (A B C D A B C D ...),
    as bench.common.alternate does, so drift on a shared machine hits all alike."""
    settings = CraftSettings(work_dir=os.path.join(root, "work"), backend="fuse", retry=POLICY)
    fakes, backends = [], []
    for index, scenario in enumerate(SCENARIOS):
        real = shutil.which(scenario.program)
        if real is None:
            raise RuntimeError(f"{scenario.program} is not installed")
        fakes.append(install_fake(scenario, root, SEED + index, os.path.realpath(real)))
        backends.append(FuseNbdBackend(start_timeout_s=scenario.start_timeout_s))
    records: list[list[Attach]] = [[] for _ in SCENARIOS]
    wall = [0.0] * len(SCENARIOS)
    for _ in range(attaches):
        for index, fake in enumerate(fakes):
            with fake_first_on_path(fake):
                if shutil.which(fake.scenario.program) != fake.script:
                    raise RuntimeError(f"the fake {fake.scenario.program} is not first on PATH")
                started = time.perf_counter()
                records[index].append(attach_once(image, settings, backends[index]))
                wall[index] += time.perf_counter() - started
    return [summarise(f, r, w) for f, r, w in zip(fakes, records, wall, strict=True)]


def summarise(fake: Fake, records: list[Attach], wall_s: float) -> dict[str, Any]:
    scenario, seed, log_path, counter = fake.scenario, fake.seed, fake.log_path, fake.counter
    decisions = [line.split() for line in _read(log_path).splitlines() if line.strip()]
    verdicts = Counter(d[2] for d in decisions)
    predicted = [fake_verdict(scenario, seed, int(d[0])) for d in decisions]
    numbers = [int(d[0]) for d in decisions]
    log_matches = [d[2] for d in decisions] == predicted and numbers == list(
        range(1, len(decisions) + 1)
    )
    injected = verdicts.get("fail", 0) + verdicts.get("slow", 0)
    failed_attempts = sum(r.attempts - (1 if r.ok else 0) for r in records)
    by_attempt = Counter(r.attempts for r in records if r.ok)
    successes = [r for r in records if r.ok]
    n = len(records)
    attempt_pcts = [_pct(by_attempt.get(k, 0), n) for k in range(1, POLICY.attempts + 1)]
    return {
        "scenario": scenario.name,
        "program": scenario.program,
        "mode": scenario.mode,
        "fault_rate": scenario.fault_rate,
        "start_timeout_s": scenario.start_timeout_s,
        "seed": seed,
        "attaches": n,
        "success_on_attempt_pct": attempt_pcts,
        "success_on_attempt": [by_attempt.get(k, 0) for k in range(1, POLICY.attempts + 1)],
        "total_success_pct": _pct(len(successes), n),
        "failed": n - len(successes),
        "failure_reasons": dict(Counter(r.error for r in records if not r.ok)),
        "median_attach_ms": _ms_median([r.attach_s for r in successes]),
        "p95_attach_ms": (
            statistics.quantiles([r.attach_s for r in successes], n=20)[-1] * 1000.0
            if len(successes) >= 2
            else None
        ),
        "median_attach_ms_by_attempts": {
            k: _ms_median([r.attach_s for r in successes if r.attempts == k])
            for k in range(1, POLICY.attempts + 1)
        },
        "median_shutdown_ms": _ms_median([r.shutdown_s for r in successes]),
        "fake_starts": len(decisions),
        "fake_counter": int(_read(counter).strip() or 0),
        "injected_faults": injected,
        "measured_fault_rate": injected / len(decisions) if decisions else 0.0,
        "failed_attempts": failed_attempts,
        "failed_attempts_not_injected": failed_attempts - injected,
        "fake_log_matches_seeded_model": log_matches,
        "model_pct": model(scenario.fault_rate, POLICY.attempts),
        "wall_s": wall_s,
        "records": [
            {"ok": r.ok, "attempts": r.attempts, "attach_ms": round(r.attach_s * 1000.0, 2)}
            for r in records
        ],
    }


def make_image(root: str) -> str:
    image = os.path.join(root, "small.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "16M"], check=True)
    return image


def _fmt_pct(value: float) -> str:
    return f"{value:.1f}%"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(results: list[dict[str, Any]], leaks: dict[str, list[str]], reaped: list[str]) -> str:
    attaches = results[0]["attaches"] if results else 0
    rows = []
    for r in results:
        scenario = next(s for s in SCENARIOS if s.name == r["scenario"])
        guide = GUIDE_ROWS.get(scenario.guide_row or "")
        guide_cell = (
            f"{scenario.guide_row}: " + " / ".join(f"{v:.1f}" for v in guide) if guide else "-"
        )
        rows.append(
            [
                r["scenario"],
                f"{r['program']} {r['mode']} {_fmt_pct(100 * r['fault_rate'])}",
                *(_fmt_pct(v) for v in r["success_on_attempt_pct"]),
                _fmt_pct(r["total_success_pct"]),
                r["failed"],
                _fmt_ms(r["median_attach_ms"]),
                guide_cell,
            ]
        )
    main_table = table(
        f"NBD attach retry: {attaches} attaches per scenario, "
        f"RetryPolicy(attempts={POLICY.attempts}, base_s={POLICY.base_s}, cap_s={POLICY.cap_s})",
        [
            "scenario",
            "injected fault per start",
            "success on attempt 1",
            "attempt 2",
            "attempt 3",
            "total success",
            "failed",
            "median attach ms",
            "guide (1 / 2 / 3 / total %)",
        ],
        rows,
    )
    detail_rows = []
    for r in results:
        by = r["median_attach_ms_by_attempts"]
        detail_rows.append(
            [
                r["scenario"],
                r["fake_starts"],
                f"{r['injected_faults']} ({_fmt_pct(100 * r['measured_fault_rate'])})",
                r["failed_attempts_not_injected"],
                "yes" if r["fake_log_matches_seeded_model"] else "NO",
                " / ".join(f"{v:.1f}" for v in r["model_pct"]),
                " / ".join(_fmt_ms(by[k]) for k in range(1, POLICY.attempts + 1)),
                _fmt_ms(r["p95_attach_ms"]),
                _fmt_ms(r["median_shutdown_ms"]),
                f"{r['wall_s']:.1f}",
            ]
        )
    detail = table(
        "Per-start detail",
        [
            "scenario",
            "fake starts",
            "injected faults",
            "failed attempts not injected",
            "fake log = seeded model",
            "independent-fault model (1 / 2 / 3 / total %)",
            "median attach ms by attempts used (1 / 2 / 3)",
            "p95 attach ms",
            "median shutdown ms",
            "total s",
        ],
        detail_rows,
    )
    target_lines = []
    for r in results:
        if abs(r["fault_rate"] - TARGET_FAULT_RATE) < 1e-9:
            met = r["total_success_pct"] >= TARGET_TOTAL_PCT
            target_lines.append(
                f"- {r['scenario']}: {r['total_success_pct']:.1f}% ({'met' if met else 'NOT met'})"
            )
    notes = [
        f"Target: >= {TARGET_TOTAL_PCT}% total success at a "
        f"{100 * TARGET_FAULT_RATE:.0f}% per-start transient fault rate.",
        *target_lines,
        f"With {POLICY.attempts} independent attempts at 10% the expected total is exactly "
        f"{model(TARGET_FAULT_RATE, POLICY.attempts)[-1]:.1f}% (one failure per 1000), so a "
        "1000-attach run sits on the target line; 4 attempts would give 99.99%.",
        "The guide's own rows are not what independent faults give: e.g. 'Module load "
        "delay' (27.5% first-attempt faults) predicts 2.1% failing after 3 attempts, the "
        "guide reports 0.4%.",
        "Leak check after all scenarios (loop devices, mounts, processes, state "
        "directories, temp dir): "
        + ("nothing left" if nothing_leaked(leaks) else f"LEFTOVERS {leaks}")
        + f"; exited-but-unwaited helpers collected at the end: {len(reaped)}"
        + (f" ({', '.join(reaped)})" if reaped else ""),
    ]
    return main_table + "\n" + detail + "\n" + "\n".join(notes) + "\n"


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    attaches = QUICK_ATTACHES if quick else ATTACHES
    root = tempfile.mkdtemp(prefix="vmcraft-bench-attach-")
    retry_log = logging.getLogger("vmcraft_tasks.craft.retry")
    saved_level = retry_log.level
    retry_log.setLevel(logging.ERROR)  # one warning per failed attempt otherwise
    results: list[dict[str, Any]] = []
    try:
        image = make_image(root)
        results = run_scenarios(image, root, attaches)
        reaped = reap_exited_children()
        leaks = leftovers(root)
    finally:
        retry_log.setLevel(saved_level)
        if not leftovers(root)["mounts"]:
            shutil.rmtree(root, ignore_errors=True)
    leaks["root_removed"] = [] if not os.path.exists(root) else [root]
    data = {
        "attaches_per_scenario": attaches,
        "quick": quick,
        "policy": {"attempts": POLICY.attempts, "base_s": POLICY.base_s, "cap_s": POLICY.cap_s},
        "backoff": "tenacity wait_random_exponential: uniform(0, min(cap, base * 2**(n-1)))",
        "image": "16 MiB qcow2 (empty), FUSE backend (qemu-nbd --snapshot + nbdfuse)",
        "guide": GUIDE_ROWS,
        "target": {"total_pct": TARGET_TOTAL_PCT, "fault_rate": TARGET_FAULT_RATE},
        "scenarios": results,
        "leaks": leaks,
        "exited_helpers_reaped_at_end": reaped,
    }
    return render(results, leaks, reaped), data


def main(argv: list[str]) -> None:
    quick = "--quick" in argv[1:]
    text, data = run(quick=quick)
    print(text)
    print("saved", save("attach_retry_quick" if quick else "attach_retry", data))


if __name__ == "__main__":
    main(sys.argv)
