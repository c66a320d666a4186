"""The one runner for every external command.

argv lists only (no shell), a timeout on every call, and errors that carry the
command, exit code and stderr tail. It is also the single seam tests and
benchmarks observe: `CommandStats` counts what actually ran.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmcraft_tasks.craft.errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


@dataclass
class CommandStats:
    """Counts of commands run, by program name; thread-safe."""

    counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, argv: Sequence[str]) -> None:
        with self._lock:
            self.counts[argv[0].rsplit("/", 1)[-1]] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()


STATS = CommandStats()

Observer = Callable[[Sequence[str]], None]
_observers: list[Observer] = []


def add_observer(observer: Observer) -> Callable[[], None]:
    """Call `observer(argv)` before every command; returns a function that removes it."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> CommandResult:
    """Run `argv` to completion and return its output.

    With `check`, an exit code outside `ok_codes` raises `CommandError`.
    A missing program or a timeout always raises.
    """
    args = [str(a) for a in argv]
    STATS.record(args)
    for observer in list(_observers):
        observer(args)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, None, reason=f"program not found ({exc.filename})") from exc
    except subprocess.TimeoutExpired as exc:
        stderr = (
            exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        )
        raise CommandError(args, None, stderr or "", timed_out=True) from exc
    elapsed = time.monotonic() - started
    log.debug("ran %s -> %s in %.1f ms", args, proc.returncode, elapsed * 1000)
    result = CommandResult(tuple(args), proc.returncode, proc.stdout, proc.stderr, elapsed)
    if check and proc.returncode not in ok_codes:
        raise CommandError(args, proc.returncode, proc.stderr, proc.stdout)
    return result


def spawn_detached(
    argv: Sequence[str],
    *,
    stderr_path: str,
) -> subprocess.Popen[bytes]:
    """Start a helper process in its own session so a dying task does not take it along.

    The caller records the pid and reaps it; stderr goes to a file so a helper that
    exits early can explain why.
    """
    args = [str(a) for a in argv]
    STATS.record(args)
    for observer in list(_observers):
        observer(args)
    with open(stderr_path, "ab") as err:
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise CommandError(args, None, reason=f"program not found ({exc.filename})") from exc
