"""Conversions in flight on this host: stoppable, and cleaned up when their holder dies.

`qemu-img convert` runs in its own session (the runner starts every command that way),
so it outlives a worker killed with -9 and would finish writing a `.part` file nobody
will ever rename. And a warm shutdown would wait for an hours-long conversion.

A conversion step therefore runs inside a `ConversionGuard`:

- it records, in `<host work dir>/conversions/`, who converts (the step's holder),
  the target, and the temporary file as soon as qemu-img is told to write it (a
  command observer sees the argv before the process starts). The conversion writes
  `<staged>.part-<random>` and renames it to the staged name, which the output
  folder then publishes as the target; the staged name is hidden and random
  (`.<target>.<hex>.tmp`, see `vmcraft_tasks.outfiles`), and any of these may be left
  by a dead worker;
- a watcher thread stops the conversion when the host is shutting down (the worker's
  main process writes a stop file on SIGTERM) or the VM ended meanwhile (cancelled,
  failed, its record gone): it kills the qemu-img working on that `.part` (found by
  its command line, verified before the kill), and `convert_image` then removes the
  file and raises, so the step can hand the VM back resumable.

When a holder is dead, the reconciler calls `cleanup()` on its record: kill its
qemu-img processes (verified by command line and temporary path) and remove the
`.part` files next to its target.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.atomicfile import atomic_write
from vmcraft_tasks.craft.convert import TEMP_INFIX
from worker import procs
from worker.semaphore import WaitStopped
from worker.steps import Holder, current_holder

if TYPE_CHECKING:
    from worker.runtime import HostRuntime

log = logging.getLogger(__name__)

CONVERSIONS_DIR = "conversions"
STOP_FILE = "stopping.json"
QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ConversionRecord:
    token: str
    job_id: str
    target: str
    holder: dict[str, Any]
    started: float
    parts: tuple[str, ...] = ()
    # qemu-img processes seen working on `parts`: (pid, start ticks, temporary file).
    pids: tuple[tuple[int, int, str], ...] = ()

    @property
    def holder_obj(self) -> Holder | None:
        return Holder.from_json(json.dumps(self.holder))

    def to_json(self) -> str:
        data = asdict(self)
        data["parts"] = list(self.parts)
        data["pids"] = [list(p) for p in self.pids]
        return json.dumps(data)


def _dir(host_work_dir: str) -> str:
    return os.path.join(host_work_dir, CONVERSIONS_DIR)


def _record_path(host_work_dir: str, token: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in token)[:200]
    return os.path.join(_dir(host_work_dir), safe + ".json")


def _write(path: str, record: ConversionRecord) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    atomic_write(path, record.to_json(), fsync=False)


def records(host_work_dir: str) -> list[tuple[str, ConversionRecord]]:
    """(path, record) of every conversion this host recorded and did not clean up."""
    found = []
    for path in sorted(glob.glob(os.path.join(_dir(host_work_dir), "*.json"))):
        try:
            with open(path) as fh:
                data = json.load(fh)
            data["parts"] = tuple(data.get("parts") or ())
            data["pids"] = tuple((int(p[0]), int(p[1]), str(p[2])) for p in data.get("pids") or ())
            found.append((path, ConversionRecord(**data)))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable conversion record %s: %s", path, exc)
    return found


def is_temporary_of(path: str, target: str) -> bool:
    """Is `path` a temporary file of a conversion to `target` (pure)? Either
    `<target>.part-<hex>` (convert_image straight to the target) or the output folder's
    staged name `.<target name>.<16 hex>.tmp`, with or without `.part-<hex>`."""
    if os.path.dirname(os.path.abspath(path)) != os.path.dirname(os.path.abspath(target)):
        return False
    name, base = os.path.basename(path), os.path.basename(target)
    return bool(
        re.fullmatch(re.escape(base + TEMP_INFIX) + r"[0-9a-f]+", name)
        or re.fullmatch(
            r"\."
            + re.escape(base)
            + r"\.[0-9a-f]{16}\.tmp(?:"
            + re.escape(TEMP_INFIX)
            + r"[0-9a-f]+)?",
            name,
        )
    )


def part_files(target: str) -> list[str]:
    """Temporary files a conversion to `target` may have left next to it."""
    directory, base = os.path.dirname(target), os.path.basename(target)
    candidates = glob.glob(os.path.join(glob.escape(directory), glob.escape(base) + "*"))
    candidates += glob.glob(os.path.join(glob.escape(directory), "." + glob.escape(base) + ".*"))
    return sorted(p for p in set(candidates) if is_temporary_of(p, target))


def _family(part: str) -> set[str]:
    """A `.part` file and the staged name it becomes."""
    return {part, part.split(TEMP_INFIX, 1)[0]}


def cleanup(path: str, record: ConversionRecord, *, protected: Iterable[str] = ()) -> list[str]:
    """Stop and remove what a dead conversion left: its qemu-img, its temporary files.

    `protected`: temporary files of live conversions (a redelivered step converting the
    same target), left alone. Returns what was done, for the log. The record goes
    last, so a cleanup that is itself interrupted is done again by the next reconcile.
    """
    done = []
    keep = {f for p in protected for f in _family(p)}
    parts = sorted({*record.parts, *part_files(record.target)} - keep)
    for part in parts:
        # The recorded pids first (still the same process, still on this file), then
        # any other qemu-img the command line shows on it (started after the last look).
        recorded = [
            pid for pid, ticks, on in record.pids if on == part and procs.same_process(pid, ticks)
        ]
        for pid in dict.fromkeys([*recorded, *procs.find(QEMU_IMG, part)]):
            if procs.kill_verified(pid, QEMU_IMG, part):
                done.append(f"killed qemu-img {pid} writing {part}")
        try:
            os.unlink(part)
            done.append(f"removed {part}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", part, exc)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return done


def request_stop(host_work_dir: str, worker_pid: int, reason: str) -> None:
    """The worker's main process asks its conversions to stop (warm shutdown)."""
    os.makedirs(host_work_dir, mode=0o700, exist_ok=True)
    record = {"worker_pid": worker_pid, "reason": reason, "at": time.time()}
    atomic_write(os.path.join(host_work_dir, STOP_FILE), json.dumps(record), fsync=False)


def clear_stop(host_work_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(host_work_dir, STOP_FILE))


def stop_requested(host_work_dir: str, worker_pid: int) -> str | None:
    """The reason the worker `worker_pid` asked its conversions to stop, if it did.

    A stop file of another (earlier) worker of this host means nothing to this one.
    """
    try:
        with open(os.path.join(host_work_dir, STOP_FILE)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if data.get("worker_pid") != worker_pid:
        return None
    return str(data.get("reason") or "the worker is shutting down")


class ConversionGuard:
    """Record a conversion and stop it when the host or the VM asks; see the module doc.

    `checks` are asked every `interval_s`; the first reason any of them returns stops
    the conversion. `stopped` then names the reason.
    """

    def __init__(
        self,
        host_work_dir: str,
        token: str,
        job_id: str,
        target: str,
        holder: Holder,
        *,
        checks: Sequence[Callable[[], str | None]] = (),
        interval_s: float = 0.5,
    ) -> None:
        self.host_work_dir = host_work_dir
        self.path = _record_path(host_work_dir, token)
        self.record = ConversionRecord(
            token=token,
            job_id=job_id,
            target=os.path.abspath(target),
            holder=json.loads(holder.to_json()),
            started=time.time(),
        )
        self.checks = list(checks)
        self.interval_s = interval_s
        self.stopped: str | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._remove_observer: Callable[[], None] | None = None

    def should_stop(self) -> str | None:
        """Why the conversion must stop, or None; asks the checks now."""
        if self.stopped is None:
            for check in self.checks:
                try:
                    reason = check()
                except Exception as exc:  # a check that cannot answer does not stop it
                    log.debug("conversion check failed: %s", exc)
                    continue
                if reason:
                    self.stopped = reason
                    break
        return self.stopped

    def _observe(self, argv: Sequence[str]) -> None:
        if not argv or os.path.basename(argv[0]) != QEMU_IMG:
            return
        parts = [a for a in argv[1:] if is_temporary_of(a, self.record.target)]
        if not parts:
            return
        with self._lock:
            known = set(self.record.parts)
            new = [p for p in parts if p not in known]
            if new:
                self.record = replace(self.record, parts=(*self.record.parts, *new))
                # Written before qemu-img starts: a crash from here on leaves a record
                # that names the file it was writing.
                _write(self.path, self.record)
        if self.stopped:
            # Stopped while the step was between commands: do not let a new one run.
            raise InterruptedError(self.stopped)

    def _kill_running(self) -> None:
        for part in self.record.parts:
            for pid in procs.find(QEMU_IMG, part):
                if procs.kill_verified(pid, QEMU_IMG, part, timeout_s=2.0):
                    log.warning("stopped qemu-img %d on %s: %s", pid, part, self.stopped)

    def _note_pids(self) -> None:
        """Record the pid of each qemu-img on our temporary files, once it runs."""
        with self._lock:
            known = {(pid, part) for pid, _ticks, part in self.record.pids}
            new = []
            for part in self.record.parts:
                for pid in procs.find(QEMU_IMG, part):
                    ticks = procs.start_ticks(pid)
                    if (pid, part) not in known and ticks is not None:
                        new.append((pid, ticks, part))
            if new:
                self.record = replace(self.record, pids=(*self.record.pids, *new))
                _write(self.path, self.record)

    def _watch(self) -> None:
        while not self._done.wait(self.interval_s):
            if self.should_stop():
                self._kill_running()
            elif self.record.parts and len(self.record.pids) < len(self.record.parts):
                self._note_pids()

    def __enter__(self) -> ConversionGuard:
        _write(self.path, self.record)
        self._remove_observer = commands.add_observer(self._observe)
        self._thread = threading.Thread(
            target=self._watch, name=f"vmcraft-convert-guard-{self.record.token}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._remove_observer is not None:
            self._remove_observer()
        # convert_image removes its temporary file on every exit; whatever is left
        # (a qemu-img that would not die, say) is the reconciler's to clean up.
        if not [p for p in self.record.parts if os.path.exists(p)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def safe_progress(report: Callable[[float], None]) -> Callable[[float], None]:
    """`report` for `convert_image(progress=...)` that never raises: a progress update
    lost in a broker outage must not kill an hours-long copy (the runner kills qemu-img
    when its output callback raises)."""
    warned = [0.0]

    def call(pct: float) -> None:
        try:
            report(pct)
        except Exception as exc:
            if time.monotonic() - warned[0] > 60:
                warned[0] = time.monotonic()
                log.warning("conversion progress not recorded: %s", exc)

    return call


class ConversionStopped(Exception):
    """A conversion was stopped before it finished, on purpose; nothing half-written
    is left (its `.part` file is removed). `kind` says what the VM should do now:

    - `shutdown`: this host is going away; the VM is handed back to the queue;
    - `cancelled`: the VM was cancelled; it ends cancelled;
    - `ended`: the VM was ended (or handed on) by someone else meanwhile;
    - `gone`: the VM's record is gone from Redis.
    """

    def __init__(self, reason: str, kind: str) -> None:
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


JOB_CHECK_EVERY_S = 2.0


def job_check(rt: HostRuntime, job_id: str) -> Callable[[], str | None]:
    from vmcraft_tasks import jobs

    last = [0.0]

    def check() -> str | None:
        now = time.monotonic()
        if now - last[0] < JOB_CHECK_EVERY_S:
            return None
        last[0] = now
        status, host = rt.probe_jobs.status_and_host(job_id)
        if status is None:
            return "gone: the VM's record is gone from Redis"
        if status == jobs.CANCELLED:
            return "cancelled: the VM was cancelled"
        if status in jobs.TERMINAL or (host and host != rt.host_id):
            return f"ended: the VM is now {status} on {host or 'no host'}"
        return None

    return check


def stop_kind(reason: str) -> tuple[str, str]:
    kind, sep, text = reason.partition(": ")
    if sep and kind in ("gone", "cancelled", "ended"):
        return kind, text
    return "shutdown", reason


@contextlib.contextmanager
def guarded_conversion(
    rt: HostRuntime, job_id: str, index: int, target: str, *, wait_s: float
) -> Iterator[ConversionGuard]:
    """Hold the host's conversion place for disk `index` of a VM and guard the
    conversion inside (see `ConversionGuard`); a stop raises `ConversionStopped`.

    Waiting for a place polls every half second and stops as well: a warm shutdown
    must not wait hours for a place either.
    """
    holder = current_holder() or Holder(
        rt.host_id, os.getpid(), procs.start_ticks(os.getpid()), "", job_id, "convert"
    )
    token = f"{job_id}:{index}"

    def shutting_down() -> str | None:
        return stop_requested(rt.host_work_dir, rt.worker_pid)

    guard = ConversionGuard(
        rt.host_work_dir,
        token,
        job_id,
        target,
        holder,
        checks=[shutting_down, job_check(rt, job_id)],
    )
    try:
        with (
            rt.conversion_slots.hold(
                token, timeout_s=wait_s, poll_s=0.5, should_stop=guard.should_stop
            ),
            guard,
        ):
            yield guard
    except WaitStopped as exc:
        kind, text = stop_kind(exc.reason)
        raise ConversionStopped(f"stopped waiting to convert disk {index}: {text}", kind) from exc
    except Exception as exc:
        if guard.stopped is None:
            raise
        kind, text = stop_kind(guard.stopped)
        raise ConversionStopped(f"conversion of disk {index} stopped: {text}", kind) from exc
