"""Decide from a guest's serial console whether it booted (pure, incremental).

Lines fall into three kinds:

- outcomes: the boot is over, one way or the other (a login prompt, the default
  target reached, emergency mode, the initramfs shell, a kernel panic, no boot
  device). The first one decides.
- warnings: something went wrong but the boot goes on (`[FAILED]`, `Timed out
  waiting for device`, `Dependency failed`, `Gave up waiting for root`). They are
  kept as evidence; a login prompt after any of them is a FAIL, since the guest
  that comes up is not the guest that was migrated (a /boot or swap missing).
- everything else, ignored.

Console text is noisy: GRUB and systemd draw with ANSI escapes and rewrite lines with
CR, so the text is cleaned and split on CR as well as LF before any matching.
Prompts end without a newline, so the unfinished last line is checked for outcomes too.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

Result = Literal["pass", "fail"]
# What counts as up: "target" passes at the first of systemd's default target or a
# login prompt; "login" waits for the prompt, for checks that will log in or want
# every unit started before the getty to have had its say.
Until = Literal["target", "login"]

# Enough to explain a failure; a guest stuck in a loop must not grow a verdict forever.
MAX_WARNINGS = 20
TAIL_LINES = 10
# GRUB draws its whole menu with cursor moves and no newline; a guest that prints
# forever without one must not grow the unfinished line without bound either.
MAX_LINE = 16 * 1024


class Reason(StrEnum):
    LOGIN_PROMPT = "login-prompt"
    DEFAULT_TARGET = "default-target"
    FAILED_UNITS = "failed-units"  # a login prompt, but after failed or timed-out units
    EMERGENCY_MODE = "emergency-mode"
    INITRAMFS_SHELL = "initramfs-shell"
    KERNEL_PANIC = "kernel-panic"
    NO_BOOT_DEVICE = "no-boot-device"
    BOOTLOADER = "bootloader"
    # Decided by the runner, not by a console line:
    TIMEOUT = "timeout"
    SILENCE = "silence"
    QEMU_EXITED = "qemu-exited"


@dataclass(frozen=True)
class Verdict:
    result: Result
    reason: Reason
    evidence: tuple[str, ...]  # the console lines that decided, cleaned
    seconds: float  # since the guest started

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    def as_dict(self) -> dict[str, object]:
        return {
            "result": self.result,
            "reason": str(self.reason),
            "evidence": list(self.evidence),
            "seconds": round(self.seconds, 1),
        }


# CSI (colours, cursor moves), OSC (titles), two-byte escapes and charset selection.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[()][0-9A-Za-z]"
    r"|\x1b[@-Z\\-_]"
)
# Control characters other than tab, CR and LF (which split lines).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BREAK = re.compile(r"[\r\n]")
# An escape sequence cut off by the end of a read: its rest arrives with the next one.
_UNFINISHED_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*|\][^\x07\x1b]*|[()])?$")


def clean(text: str) -> str:
    """Console text without ANSI escapes and control characters; CR and LF stay."""
    return _CONTROL.sub("", _ANSI.sub("", text))


@dataclass(frozen=True)
class _Outcome:
    pattern: re.Pattern[str]
    result: Result
    reason: Reason
    # A prompt waits for input without ending its line, so it must match the
    # unfinished last line; anything else waits for its newline, to keep it whole.
    prompt: bool = False


def _fail(pattern: str, reason: Reason, *, prompt: bool = False) -> _Outcome:
    return _Outcome(re.compile(pattern, re.IGNORECASE), "fail", reason, prompt)


def _pass(pattern: str, reason: Reason, *, prompt: bool = False) -> _Outcome:
    return _Outcome(re.compile(pattern, re.IGNORECASE), "pass", reason, prompt)


_OUTCOMES = (
    _fail(r"Kernel panic - not syncing", Reason.KERNEL_PANIC),
    _fail(r"You are in (emergency|rescue) mode", Reason.EMERGENCY_MODE),
    _fail(r"Reached target .*(emergency|rescue)\.target", Reason.EMERGENCY_MODE),
    _fail(r"Give root password for maintenance", Reason.EMERGENCY_MODE, prompt=True),
    _fail(r"Press Enter for maintenance", Reason.EMERGENCY_MODE, prompt=True),
    _fail(r"Cannot open access to console, the root account is locked", Reason.EMERGENCY_MODE),
    _fail(r"ALERT!.*does not exist", Reason.INITRAMFS_SHELL),
    _fail(r"^\(initramfs\)", Reason.INITRAMFS_SHELL, prompt=True),
    _fail(r"No bootable device", Reason.NO_BOOT_DEVICE),
    _fail(r"^grub rescue>", Reason.BOOTLOADER, prompt=True),
    # "<hostname> login:" from agetty; not "Last login:" printed after a login.
    _pass(r"^(?!last )(\S+ )?login:(\s|$)", Reason.LOGIN_PROMPT, prompt=True),
    _pass(r"Reached target .*(multi-user|graphical)\.target", Reason.DEFAULT_TARGET),
)

_WARNINGS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\[FAILED\]",
        r"Timed out waiting for device",
        r"Dependency failed",
        r"Gave up waiting for (root|suspend)",
        r"Failed to mount .* as root file system",  # initramfs: found, but cannot mount
        r"^mount: mounting .* failed",
        r"^error: ",  # GRUB: a missing file or disk; its menu or prompt follows
    )
)


def _match_outcome(line: str, *, partial: bool, until: Until) -> _Outcome | None:
    for outcome in _OUTCOMES:
        if partial and not outcome.prompt:
            continue
        if until == "login" and outcome.reason is Reason.DEFAULT_TARGET:
            continue
        if outcome.pattern.search(line):
            return outcome
    return None


# GRUB messages that say nothing about the guest: Debian's `linux` command asks for a
# video mode, and a headless boot (no display device) has none; the boot goes on.
_HARMLESS = tuple(
    re.compile(p, re.IGNORECASE) for p in (r"^error: no suitable video mode found\.?$",)
)


def _is_warning(line: str) -> bool:
    if any(p.search(line) for p in _HARMLESS):
        return False
    return any(p.search(line) for p in _WARNINGS)


@dataclass
class ConsoleWatcher:
    """Feed console text as it arrives; `feed` returns a Verdict once the console shows one."""

    until: Until = "target"
    warnings: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    _pending: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def feed_bytes(self, data: bytes, seconds: float) -> Verdict | None:
        """As `feed`, for raw console bytes (a UTF-8 character may span two reads)."""
        return self.feed(self._decoder.decode(data), seconds)

    def feed(self, text: str, seconds: float) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        # Split raw text and clean whole lines: an escape may straddle two reads.
        pieces = _BREAK.split(self._pending + text)
        self._pending = pieces.pop()
        if len(self._pending) > MAX_LINE:
            pieces.append(self._pending)
            self._pending = ""
        for piece in pieces:
            if self._line(clean(piece), seconds, partial=False):
                return self.verdict
        self._line(self._unfinished_line(), seconds, partial=True)
        return self.verdict

    def _unfinished_line(self) -> str:
        return clean(_UNFINISHED_ESCAPE.sub("", self._pending)).strip()

    def finish(
        self, result: Result, reason: Reason, seconds: float, note: str | None = None
    ) -> Verdict:
        """A verdict the console did not give (timeout, silence, qemu gone), with what it showed.

        Evidence: the warnings, then the last lines shown, then `note` (the runner's
        own words on why it stopped).
        """
        if self.verdict is not None:
            return self.verdict
        unfinished = self._unfinished_line()
        shown = [*self.tail, unfinished] if unfinished else self.tail
        evidence = [*self.warnings, *(line for line in shown if line not in self.warnings)]
        if note:
            evidence.append(note)
        self.verdict = Verdict(result, reason, tuple(evidence), seconds)
        return self.verdict

    def _line(self, raw: str, seconds: float, *, partial: bool) -> bool:
        line = raw.strip()
        if not line:
            return False
        decided = _match_outcome(line, partial=partial, until=self.until)
        if decided is None:
            if not partial:
                self._remember(line)
            return False
        result, reason = decided.result, decided.reason
        if result == "pass" and self.warnings:
            result, reason = "fail", Reason.FAILED_UNITS
        self.verdict = Verdict(result, reason, (*self.warnings, line), seconds)
        return True

    def _remember(self, line: str) -> None:
        if _is_warning(line) and len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(line)
        self.tail = [*self.tail[-(TAIL_LINES - 1) :], line]


def judge(text: str, seconds: float = 0.0, *, until: Until = "target") -> Verdict | None:
    """The verdict for a whole recorded console text, or None if it shows no outcome yet."""
    return ConsoleWatcher(until=until).feed(text, seconds)
