"""Process identity on this host: who holds a place, and is it still the same process.

A pid alone does not name a process for long: after a crash the kernel hands the
number to the next process that starts. A holder is therefore recorded as the pid
plus the process's start time (field 22 of /proc/<pid>/stat, in clock ticks since
boot), and it is alive only while both still match.

Killing is by recorded pid only, and only after its command line says it is the
program we recorded working on the file we recorded: never by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot); None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def same_process(pid: int, ticks: int | None) -> bool:
    """True while `pid` runs and is the process that started at `ticks`."""
    if pid <= 0:
        return False
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def find(program: str, argument: str) -> list[int]:
    """Pids of live `program` processes (argv[0]'s base name) with `argument` in argv.

    Used to find a qemu-img working on a temporary file we named: the exact path is
    an argument of its command line, and nothing else on the host uses that name.
    """
    found = []
    for pid in _pids():
        argv = cmdline(pid)
        named = argv and os.path.basename(argv[0]) == program and argument in argv[1:]
        if named and start_ticks(pid) is not None:
            found.append(pid)
    return found


def kill_verified(pid: int, program: str, argument: str, *, timeout_s: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL, `pid` if it still is `program` working on `argument`.

    Returns True when the process is gone (or was never ours to kill).
    """
    ticks = start_ticks(pid)
    argv = cmdline(pid)
    if ticks is None or not argv:
        return True
    if os.path.basename(argv[0]) != program or argument not in argv[1:]:
        log.warning("not killing pid %d: it is %s, not %s on %s", pid, argv[:1], program, argument)
        return True
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, timeout_s)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not same_process(pid, ticks):
                return True
            time.sleep(0.02)
    return not same_process(pid, ticks)


def kill_all(pids: Sequence[int], program: str, argument: str) -> list[int]:
    """Kill each verified pid; returns those that are gone."""
    return [pid for pid in pids if kill_verified(pid, program, argument)]
