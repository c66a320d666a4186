"""What the offline fixes changed, would change, or could not do.

The records hold guest file texts, and their dict form goes into JSON reports and the
Redis job record. So `to_dict` is where two rules for guest text are kept:

- secrets never leave: every text, change line, skip reason and note is redacted
  (`craft.redact`); the objects themselves keep the real text, which is what the fix
  writes to the guest;
- size is bounded: each before/after text, each change line, the changes of a record,
  the records and skips of a report, and all the text of a report together have a
  limit. Whatever a limit cuts is said in the record (a marker line, its `note`) or in
  the report's notes, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.redact import redact_line, redact_text, secret_values

# Report bounds, in characters. A guest config is a few KiB; these only stop a hostile
# or broken guest from putting hundreds of MB into a report and a Redis record.
MAX_RECORD_TEXT = 64 * 1024  # each before/after text of one record
MAX_CHANGE_LINE = 4096  # each line of a Change, each skip reason
MAX_CHANGES_PER_RECORD = 256
MAX_FIX_RECORDS = 512  # records listed per report (changed ones are kept first)
MAX_FIX_SKIPS = 512  # skips listed per report, and as many failures
MAX_REPORT_TEXT = 4 * 1024 * 1024  # all before/after texts and change lines of a report


class _Budget:
    """Characters of text a report may still hold."""

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self, *texts: str | None) -> None:
        self.left -= sum(len(text) for text in texts if text is not None)


def _redact_line(text: str | None, values: Iterable[str] = ()) -> str | None:
    """One line (a Change side, a skip reason) redacted and cut to `MAX_CHANGE_LINE`."""
    if text is None:
        return None
    shown = redact_line(text[:MAX_CHANGE_LINE], values=values)
    if len(text) <= MAX_CHANGE_LINE:
        return shown
    # Marked after redaction, so a secret value running to the cut cannot swallow it.
    return f"{shown}[vmcraft: {len(text) - MAX_CHANGE_LINE} more characters]"


def _cut_text(text: str | None, cap: int) -> tuple[str | None, int]:
    """The head of `text` that fits `cap` (at a line end when one is near), and how
    many characters were left out."""
    if text is None or len(text) <= cap:
        return text, 0
    cut = text.rfind("\n", 0, cap) + 1
    if cut < cap // 2:
        cut = cap
    return text[:cut], len(text) - cut


def _marked(text: str | None, omitted: int) -> str | None:
    # Added after redaction, so an open secret value at the cut cannot swallow it.
    if text is None or not omitted:
        return text
    newline = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{newline}[vmcraft: {omitted} more characters not recorded]\n"


class RewriteError(VMCraftError):
    """A guest config file could not be understood well enough to rewrite it safely."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Change:
    """One edit inside a file: a line (or setting) before and after.

    `before` is None for an added line, `after` is None for a removed one.
    """

    before: str | None
    after: str | None
    reason: str

    def to_dict(self, *, values: Iterable[str] = ()) -> dict[str, Any]:
        """The change with secrets redacted; `values`: secrets found in its file."""
        found = tuple(values)
        return {
            "before": _redact_line(self.before, found),
            "after": _redact_line(self.after, found),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class FixRecord:
    """One file or link a fix looked at.

    For edited files `before`/`after` are the whole text (`before` None: the file is
    new); for a removed symlink `before` is its raw target and `after` is None.
    `changed` is whether the fix changes it (would change it, in a dry run).
    """

    name: str  # the fix: fstab, netplan, vmware-tools, ...
    path: str  # the guest path the fix aimed at (a symlink's target is in `note`)
    before: str | None
    after: str | None
    changed: bool
    note: str | None = None
    changes: tuple[Change, ...] = ()

    def to_dict(self, *, budget: _Budget | None = None) -> dict[str, Any]:
        """The record as a report holds it: redacted, and cut to the report's bounds.

        `budget` is shared by the records of one report (see `FixReport.to_dict`).
        """
        budget = budget or _Budget(MAX_REPORT_TEXT)
        cap = max(0, min(MAX_RECORD_TEXT, budget.left // 2))
        before, before_cut = _cut_text(self.before, cap)
        after, after_cut = _cut_text(self.after, cap)
        budget.take(before, after)
        # A secret assigned in one text is hidden wherever it is echoed in the other
        # and in the change lines.
        found = secret_values(before or "", path=self.path)
        if after != before:
            found |= secret_values(after or "", path=self.path)
        shown_before = None if before is None else redact_text(before, path=self.path, values=found)
        if after == before:
            shown_after = shown_before
        else:
            shown_after = (
                None if after is None else redact_text(after, path=self.path, values=found)
            )
        notes = [] if self.note is None else [redact_line(self.note)]
        for what, text, omitted in (
            ("before", self.before, before_cut),
            ("after", self.after, after_cut),
        ):
            if omitted and text is not None:
                why = "record limit" if cap == MAX_RECORD_TEXT else "report's text budget"
                notes.append(
                    f"{what}: the first {len(text) - omitted} of {len(text)} characters "
                    f"recorded ({why})"
                )
        changes = []
        for change in self.changes[:MAX_CHANGES_PER_RECORD]:
            if budget.left <= 0:
                break
            shown = change.to_dict(values=found)
            budget.take(shown["before"], shown["after"])
            changes.append(shown)
        if len(changes) < len(self.changes):
            notes.append(f"{len(self.changes) - len(changes)} more changes not listed")
        return {
            "name": self.name,
            "path": self.path,
            "before": _marked(shown_before, before_cut),
            "after": _marked(shown_after, after_cut),
            "changed": self.changed,
            "note": "; ".join(notes) if notes else None,
            "changes": changes,
        }


@dataclass(frozen=True)
class FixSkip:
    """Something a fix should have handled but did not (or could not write)."""

    name: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        # Reasons quote guest lines (an fstab entry with its cifs password=).
        return {**asdict(self), "reason": _redact_line(self.reason)}


def _listed(records: tuple[FixRecord, ...]) -> tuple[list[FixRecord], int, int]:
    """The records a report lists, how many it leaves out, and how many of those are
    unchanged. Changed records are kept first: an unchanged one only says a file was
    looked at."""
    if len(records) <= MAX_FIX_RECORDS:
        return list(records), 0, 0
    changed = [i for i, record in enumerate(records) if record.changed][:MAX_FIX_RECORDS]
    room = MAX_FIX_RECORDS - len(changed)
    unchanged = [i for i, record in enumerate(records) if not record.changed][:room]
    kept = sorted([*changed, *unchanged])
    left_out = len(records) - len(kept)
    unchanged_left_out = sum(1 for r in records if not r.changed) - len(unchanged)
    return [records[i] for i in kept], left_out, unchanged_left_out


def _skips(skips: tuple[FixSkip, ...], what: str) -> list[dict[str, Any]]:
    listed = [skip.to_dict() for skip in skips[:MAX_FIX_SKIPS]]
    if len(skips) > MAX_FIX_SKIPS:
        more = len(skips) - MAX_FIX_SKIPS
        listed.append(
            FixSkip(
                "report", "/", f"{more} more {what} not listed (limit {MAX_FIX_SKIPS})"
            ).to_dict()
        )
    return listed


@dataclass(frozen=True)
class FixReport:
    """The outcome of `apply_fixes` on one guest root."""

    fixer: str | None  # the Fixer's name; None when the OS gets no fixes
    dry_run: bool
    applied: tuple[FixRecord, ...] = ()
    skipped: tuple[FixSkip, ...] = ()
    failed: tuple[FixSkip, ...] = ()  # a write that was attempted and did not happen
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return any(record.changed for record in self.applied)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON reports and the job record hold it: redacted and bounded."""
        budget = _Budget(MAX_REPORT_TEXT)
        records, left_out, unchanged = _listed(self.applied)
        notes = [redact_line(note) for note in self.notes]
        if left_out:
            notes.append(
                f"{left_out} more fix records not listed ({unchanged} of them unchanged "
                f"files): a report lists at most {MAX_FIX_RECORDS}"
            )
        return {
            "fixer": self.fixer,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "applied": [record.to_dict(budget=budget) for record in records],
            "skipped": _skips(self.skipped, "skips"),
            "failed": _skips(self.failed, "failures"),
            "notes": notes,
        }
