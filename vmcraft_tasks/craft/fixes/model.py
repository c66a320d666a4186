"""What the offline fixes changed, would change, or could not do."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft.errors import VMCraftError


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["changes"] = [change.to_dict() for change in self.changes]
        return data


@dataclass(frozen=True)
class FixSkip:
    """Something a fix should have handled but did not (or could not write)."""

    name: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        return {
            "fixer": self.fixer,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "applied": [record.to_dict() for record in self.applied],
            "skipped": [skip.to_dict() for skip in self.skipped],
            "failed": [fail.to_dict() for fail in self.failed],
            "notes": list(self.notes),
        }
