"""Boot checks in flight on this host: limited, stoppable, and reaped when their holder dies.

A boot check runs qemu for minutes, in a session of its own (the library's runner),
so a worker killed with -9 would leave it running. Each check therefore runs inside
`guarded_boot`:

- it holds a place of the host's boot-check limit (`VMCRAFT_MAX_BOOT_CHECKS`);
- it records, in `<host work dir>/bootchecks/`, who runs the check (the step's
  holder) and, as soon as qemu starts, qemu's pid, start time and the file its
  command line names (the serial log): enough to kill exactly that process later;
- `should_stop` tells the library's watcher to kill qemu at once when the host is
  shutting down (the worker's stop file) or the VM ended meanwhile (cancelled).

When a holder is dead, the reconciler calls `cleanup()` on its record: qemu is killed
by its recorded pid, only while it is still the process that started then and still
names our log.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from vmcraft_tasks.craft.atomicfile import atomic_write
from worker import procs
from worker.conversions import ConversionStopped, job_check, stop_kind, stop_requested
from worker.semaphore import WaitStopped
from worker.steps import Holder, current_holder

if TYPE_CHECKING:
    from worker.runtime import HostRuntime

log = logging.getLogger(__name__)

BOOTCHECKS_DIR = "bootchecks"
QEMU_PROGRAMS = frozenset({"qemu-system-x86_64", "qemu-system-x86"})
KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class BootRecord:
    token: str
    job_id: str
    holder: dict[str, Any]
    started: float
    marker: str  # a path qemu's command line names (the serial log)
    pid: int | None = None
    ticks: int | None = None

    @property
    def holder_obj(self) -> Holder | None:
        return Holder.from_json(json.dumps(self.holder))


def _dir(host_work_dir: str) -> str:
    return os.path.join(host_work_dir, BOOTCHECKS_DIR)


def record_path(host_work_dir: str, token: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in token)[:200]
    return os.path.join(_dir(host_work_dir), safe + ".json")


def _write(path: str, record: BootRecord) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    atomic_write(path, json.dumps(asdict(record)), fsync=False)


def records(host_work_dir: str) -> list[tuple[str, BootRecord]]:
    found = []
    for path in sorted(glob.glob(os.path.join(_dir(host_work_dir), "*.json"))):
        try:
            with open(path) as fh:
                found.append((path, BootRecord(**json.load(fh))))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable boot-check record %s: %s", path, exc)
    return found


def is_our_qemu(pid: int, ticks: int | None, marker: str) -> bool:
    """True while `pid` is the qemu that started at `ticks` and names `marker`."""
    argv = procs.cmdline(pid)
    return (
        procs.same_process(pid, ticks)
        and bool(argv)
        and os.path.basename(argv[0]) in QEMU_PROGRAMS
        and any(marker in arg for arg in argv[1:])
    )


def kill_qemu(pid: int, ticks: int | None, marker: str) -> bool:
    """SIGKILL the recorded qemu (its whole session: it leads one); True when gone."""
    if not is_our_qemu(pid, ticks, marker):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        if not procs.same_process(pid, ticks):
            return True
        time.sleep(0.02)
    return not procs.same_process(pid, ticks)


def cleanup(path: str, record: BootRecord) -> str:
    """Kill a dead check's qemu, then drop its record; what was done, for the log."""
    done = "no qemu running"
    if record.pid is not None and is_our_qemu(record.pid, record.ticks, record.marker):
        gone = kill_qemu(record.pid, record.ticks, record.marker)
        done = f"killed qemu {record.pid}" if gone else f"could not kill qemu {record.pid}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return done


class BootGuard:
    """The record of one boot check, and the reasons it must stop."""

    def __init__(self, rt: HostRuntime, job_id: str, token: str, marker: str) -> None:
        holder = current_holder() or Holder(
            rt.host_id, os.getpid(), procs.start_ticks(os.getpid()), "", job_id, "boot_check"
        )
        self.path = record_path(rt.host_work_dir, token)
        self.record = BootRecord(token, job_id, json.loads(holder.to_json()), time.time(), marker)
        self._checks: list[Callable[[], str | None]] = [
            lambda: stop_requested(rt.host_work_dir, rt.worker_pid),
            job_check(rt, job_id),
        ]
        self.stopped: str | None = None

    def should_stop(self) -> str | None:
        if self.stopped is None:
            for check in self._checks:
                try:
                    reason = check()
                except Exception as exc:  # a check that cannot answer does not stop it
                    log.warning("boot-check stop check failed: %s", exc)
                    continue
                if reason:
                    self.stopped = reason
                    break
        return self.stopped

    def on_qemu(self, pid: int) -> None:
        self.record = replace(self.record, pid=pid, ticks=procs.start_ticks(pid))
        _write(self.path, self.record)


@contextlib.contextmanager
def guarded_boot(
    rt: HostRuntime, job_id: str, marker: str, *, wait_s: float
) -> Iterator[BootGuard]:
    """Hold a boot-check place of this host and record the check (see the module doc).

    Waiting for a place stops as the check would: a warm shutdown or a cancel raises
    `ConversionStopped` (the runner hands the VM back, or ends it cancelled).
    """
    token = f"{job_id}:boot"
    guard = BootGuard(rt, job_id, token, marker)
    try:
        with rt.boot_slots.hold(token, timeout_s=wait_s, poll_s=0.5, should_stop=guard.should_stop):
            _write(guard.path, guard.record)
            try:
                yield guard
            finally:
                if guard.record.pid is not None:
                    kill_qemu(guard.record.pid, guard.record.ticks, marker)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(guard.path)
    except WaitStopped as exc:
        kind, text = stop_kind(exc.reason)
        raise ConversionStopped(f"stopped waiting to boot-check: {text}", kind) from exc


def stopped(guard: BootGuard) -> ConversionStopped:
    """What a step raises when its boot check was stopped on purpose."""
    kind, text = stop_kind(guard.stopped or "shutdown")
    return ConversionStopped(f"boot check stopped: {text}", kind)
