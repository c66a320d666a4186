"""The one runner for every external command.

argv lists only (no shell), a timeout on every call, and errors that carry the
command, exit code and stderr tail. It is also the single seam tests and
benchmarks observe: `CommandStats` counts what actually ran.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmcraft_tasks.craft.errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# A streaming command may run for hours; only the end of its stderr explains a failure.
STREAMING_STDERR_KEEP = 64 * 1024
_READ_SIZE = 64 * 1024


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


@contextlib.contextmanager
def recorded() -> Iterator[list[str]]:
    """Program names (argv[0] base names) of the commands started inside the block."""
    ran: list[str] = []
    stop = add_observer(lambda argv: ran.append(os.path.basename(argv[0])))
    try:
        yield ran
    finally:
        stop()


def add_observer(observer: Observer) -> Callable[[], None]:
    """Call `observer(argv)` before every command; returns a function that removes it."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def _announce(args: Sequence[str]) -> None:
    STATS.record(args)
    for observer in list(_observers):
        observer(args)


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
    _announce(args)
    started = time.monotonic()
    try:
        # Its own session, so a timeout kills what it started too (a shell wrapper's
        # child, a generator's hooks), not just the program we named.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, None, reason=f"program not found ({exc.filename})") from exc
    try:
        stdout, stderr = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CommandError(args, None, _drain_stderr(proc), timed_out=True) from None
    except BaseException:
        _kill_group(proc)
        raise
    elapsed = time.monotonic() - started
    log.debug("ran %s -> %s in %.1f ms", args, proc.returncode, elapsed * 1000)
    result = CommandResult(tuple(args), proc.returncode, stdout, stderr, elapsed)
    if check and proc.returncode not in ok_codes:
        raise CommandError(args, proc.returncode, stderr, stdout)
    return result


def _drain_stderr(proc: subprocess.Popen[str]) -> str:
    """What a killed command had written to stderr; a process that left our group may
    still hold the pipe open, so this does not wait for it long."""
    try:
        _out, err = proc.communicate(timeout=2.0)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return ""
    return err or ""


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
    _announce(args)
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


_LINE_BREAK = re.compile(r"[\r\n]")


def split_output(buffer: str) -> tuple[list[str], str]:
    """Split streamed text on CR and LF: (complete non-empty pieces, unfinished rest) (pure).

    Progress meters rewrite one line with CR, so CR ends a piece just as LF does.
    """
    parts = _LINE_BREAK.split(buffer)
    return [p for p in parts[:-1] if p], parts[-1]


class _StreamSink:
    """Collects a streamed command's output and hands stdout pieces to `on_output`."""

    def __init__(self, on_output: Callable[[str], None]) -> None:
        self.on_output = on_output
        self.stdout_parts: list[str] = []
        self.stderr = bytearray()
        # Incremental: a UTF-8 character split across two reads is decoded whole.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def out(self, data: bytes, *, final: bool = False) -> None:
        text = self._decoder.decode(data, final=final)
        self.stdout_parts.append(text)
        pieces, self._pending = split_output(self._pending + text)
        if final and self._pending:
            pieces.append(self._pending)
            self._pending = ""
        for piece in pieces:
            self.on_output(piece)

    def err(self, data: bytes) -> None:
        self.stderr += data
        del self.stderr[:-STREAMING_STDERR_KEEP]

    @property
    def stdout_text(self) -> str:
        return "".join(self.stdout_parts)

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")


def _pump(proc: subprocess.Popen[bytes], sink: _StreamSink, deadline: float) -> bool:
    """Read both pipes until EOF or the deadline; True when the deadline came first.

    One selector instead of two blocking reads: draining stderr while waiting for
    stdout means a chatty stderr can never fill its pipe and stall the command.
    """
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, sink.out)
        selector.register(proc.stderr, selectors.EVENT_READ, sink.err)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, _READ_SIZE)
                if data:
                    key.data(data)
                else:
                    selector.unregister(key.fileobj)
    sink.out(b"", final=True)
    return False


def kill_session(proc: subprocess.Popen[Any]) -> None:
    """Kill a helper started by `spawn_detached`, with everything in its session."""
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill the process group we created for `proc`, then reap its leader.

    Called before the leader is reaped, so its pid (the group id) cannot have been
    reused by an unrelated process.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_streaming(
    argv: Sequence[str],
    *,
    on_output: Callable[[str], None],
    timeout: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    env: dict[str, str] | None = None,
) -> CommandResult:
    """Run `argv`, passing each piece of stdout (split on CR and LF) to `on_output` as it arrives.

    The same contract as `run`: recorded in STATS and seen by observers, a timeout
    on the whole run, `CommandError` (command, exit code, stderr tail) on failure.
    The command runs in its own process group; on timeout, or when anything raises
    while it runs (an interrupt, `on_output` itself), the whole group is killed and
    reaped before the exception leaves, so no half-finished writer outlives the call.
    The returned stderr keeps only its last `STREAMING_STDERR_KEEP` bytes.
    """
    args = [str(a) for a in argv]
    _announce(args)
    started = time.monotonic()
    deadline = started + timeout
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, None, reason=f"program not found ({exc.filename})") from exc
    sink = _StreamSink(on_output)
    returncode: int | None = None
    try:
        if not _pump(proc, sink, deadline):
            # Both pipes closed, but the process may live on: still bound by the timeout.
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    finally:
        if returncode is None:
            _kill_group(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if returncode is None:
        raise CommandError(args, None, sink.stderr_text, sink.stdout_text, timed_out=True)
    elapsed = time.monotonic() - started
    log.debug("streamed %s -> %s in %.1f ms", args, returncode, elapsed * 1000)
    result = CommandResult(tuple(args), returncode, sink.stdout_text, sink.stderr_text, elapsed)
    if check and returncode not in ok_codes:
        raise CommandError(args, returncode, sink.stderr_text, sink.stdout_text)
    return result
