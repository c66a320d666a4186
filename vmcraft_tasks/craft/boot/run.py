"""Boot a guest headless under qemu and watch its serial console until it shows a verdict.

qemu runs in a session of its own (commands.spawn_detached) and is killed as a whole
process group on every way out of `boot_check`: a verdict, a timeout, silence, an
exception or an interrupt. Its exit is noticed with `waitid(WNOWAIT)`, which leaves
the leader unreaped until the group has been killed, so the group id can never have
been handed to an unrelated process by then.

Two hooks let a caller that owns the boot steer it: `on_start(pid)` runs right after
qemu started (to record the pid for a reaper), and `should_stop()` is polled every
round; a reason from it kills qemu at once and raises `BootStopped`. A firmware
debug log (`spec.debugcon_log`) is watched next to the console: SeaBIOS's "No
bootable device." there ends the boot as soon as it is written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.boot.console import ConsoleWatcher, Reason, Until, Verdict
from vmcraft_tasks.craft.boot.qemu import BootSpec, QemuSpecError, qemu_argv
from vmcraft_tasks.craft.errors import VMCraftError

_READ_SIZE = 64 * 1024
# SIGKILL cannot be ignored; a qemu still there after this is stuck in the kernel.
_REAP_TIMEOUT_S = 30.0
_STDERR_TAIL = 400


@dataclass(frozen=True)
class BootLimits:
    overall_s: float = 600.0  # the whole boot, from qemu's start
    # No console output for this long ends the boot. An initramfs waiting for its
    # root device prints nothing for its 30 s rootdelay, so keep this well above that.
    silence_s: float = 120.0
    poll_s: float = 0.2
    until: Until = "target"  # see console.Until


DEFAULT_LIMITS = BootLimits()

StopCheck = Callable[[], str | None]
OnStart = Callable[[int], None]


class BootStopped(VMCraftError):
    """`should_stop` gave a reason: qemu was killed before the console decided."""

    def __init__(self, reason: str, seconds: float) -> None:
        self.reason = reason
        self.seconds = seconds
        super().__init__(f"boot stopped after {seconds:.1f} s: {reason}")


def boot_check(
    spec: BootSpec,
    limits: BootLimits = DEFAULT_LIMITS,
    *,
    stderr_path: str | None = None,
    should_stop: StopCheck | None = None,
    on_start: OnStart | None = None,
) -> Verdict:
    """Boot `spec`, stop at the first verdict the console shows, and return it.

    The serial log stays in `spec.serial_log`, qemu's stderr in `stderr_path`
    (default: the log's path + ".stderr"). Raises QemuSpecError for a spec without a
    serial log file, CommandError if qemu cannot be started and BootStopped when
    `should_stop` asked for it; qemu is gone whenever this returns or raises.
    """
    if spec.serial_log is None:
        raise QemuSpecError("boot_check watches the console through a file: set serial_log")
    log_path = spec.serial_log
    err_path = stderr_path or log_path + ".stderr"
    argv = qemu_argv(spec)
    # qemu appends (see qemu.py): start from an empty file so an old boot is not re-read.
    Path(log_path).write_bytes(b"")
    if spec.debugcon_log is not None:
        Path(spec.debugcon_log).write_bytes(b"")
    started = time.monotonic()
    proc = commands.spawn_detached(argv, stderr_path=err_path)
    try:
        if on_start is not None:
            on_start(proc.pid)
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(log_path, "rb"))
            debug = None
            if spec.debugcon_log is not None:
                debug = files.enter_context(open(spec.debugcon_log, "rb"))
            return _watch(
                proc, log, limits, started, err_path, debug=debug, should_stop=should_stop
            )
    finally:
        _kill_group(proc)


def _firmware_verdict(
    debug: BinaryIO | None, firmware: ConsoleWatcher, seconds: float
) -> Verdict | None:
    """The firmware's "No bootable device", once its debug log shows it; its other
    lines (a good boot's "Booting from Hard Disk...") decide nothing."""
    if debug is None:
        return None
    data = debug.read(_READ_SIZE)
    verdict = firmware.feed_bytes(data, seconds) if data else firmware.verdict
    return verdict if verdict is not None and verdict.reason is Reason.NO_BOOT_DEVICE else None


def _watch(
    proc: subprocess.Popen[bytes],
    log: BinaryIO,
    limits: BootLimits,
    started: float,
    err_path: str,
    *,
    debug: BinaryIO | None = None,
    should_stop: StopCheck | None = None,
) -> Verdict:
    watcher = ConsoleWatcher(until=limits.until)
    firmware = ConsoleWatcher()
    last_output = started
    while True:
        if should_stop is not None and (reason := should_stop()) is not None:
            raise BootStopped(reason, time.monotonic() - started)
        data = log.read(_READ_SIZE)
        now = time.monotonic()
        if (failed := _firmware_verdict(debug, firmware, now - started)) is not None:
            return failed
        if data:
            last_output = now
            verdict = watcher.feed_bytes(data, now - started)
            if verdict is not None:
                return verdict
        elif (status := _exit_status(proc)) is not None:
            # Its last words may have landed between the read above and the exit.
            verdict = watcher.feed_bytes(log.read(), now - started) or _firmware_verdict(
                debug, firmware, now - started
            )
            stderr = _tail(err_path)
            note = f"qemu exited with status {status}" + (f": {stderr}" if stderr else "")
            return verdict or watcher.finish("fail", Reason.QEMU_EXITED, now - started, note)
        # Checked after output too: a guest that never stops printing must still end.
        if now - started > limits.overall_s:
            note = f"no verdict within {limits.overall_s:g} s"
            return watcher.finish("fail", Reason.TIMEOUT, now - started, note)
        if now - last_output > limits.silence_s:
            note = f"no console output for {limits.silence_s:g} s"
            return watcher.finish("fail", Reason.SILENCE, now - started, note)
        if not data:
            time.sleep(limits.poll_s)


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """qemu's exit status if it has exited, without reaping it (see the module doc)."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_pid == 0:
        return None
    return info.si_status


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=_REAP_TIMEOUT_S)


def _tail(path: str) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line for line in text[-_STDERR_TAIL:].splitlines() if line.strip())
