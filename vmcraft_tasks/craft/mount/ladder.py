"""Mount one filesystem, climbing the fallback ladder until a rung holds."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.mount.plan import EXT_TYPES, MountStrategy, plan_strategies
from vmcraft_tasks.craft.mount.tracker import MountTracker, TrackedMount

MOUNT_TIMEOUT_S = 60.0


@dataclass
class MountResult:
    """Truthy when mounted. Says which rung held and whether the view may be stale."""

    device: str
    mountpoint: str
    ok: bool
    fstype: str | None = None
    strategy: str | None = None
    driver: str | None = None
    options: list[str] = field(default_factory=list)
    stale_view: bool = False
    journal_replayed: bool = False
    tried: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    note: str | None = None

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe_failure(exc: CommandError) -> str:
    return exc.stderr_tail or str(exc)


def _note(
    strategy: MountStrategy, fstype: str | None, *, replayed: bool, readonly: bool
) -> str | None:
    notes = []
    if strategy.driver == "fuse":
        notes.append(
            f"no kernel driver for {fstype}: mounted read-only with {strategy.program} (FUSE)"
        )
    if strategy.skips_journal:
        notes.append("journal not replayed: contents are the stale pre-journal view")
    if replayed:
        notes.append(
            "journal replayed into the throw-away overlay; the source is unchanged"
            if readonly
            else "journal replayed into the image (write mode)"
        )
    return "; ".join(notes) or None


def mount_with_fallback(
    device: str,
    mountpoint: str,
    *,
    fstype: str | None,
    readonly: bool,
    kernel_filesystems: Collection[str],
    tracker: MountTracker,
    needs_recovery: bool = False,
) -> MountResult:
    """Try each planned rung; never raises for a filesystem that will not mount."""
    strategies = plan_strategies(fstype, readonly=readonly, kernel_filesystems=kernel_filesystems)
    result = MountResult(device=device, mountpoint=mountpoint, ok=False, fstype=fstype)
    if not strategies:
        result.error = f"{fstype} is not a mountable filesystem"
        return result
    try:
        os.makedirs(mountpoint, exist_ok=True)
    except OSError as exc:
        # Typically a mountpoint missing inside a read-only parent filesystem.
        result.error = f"cannot create mountpoint {mountpoint}: {exc.strerror}"
        return result
    for strategy in strategies:
        try:
            commands.run(strategy.argv(device, mountpoint), timeout=MOUNT_TIMEOUT_S)
        except CommandError as exc:
            result.tried.append({"strategy": strategy.name, "error": _describe_failure(exc)})
            continue
        tracker.add(TrackedMount(device, mountpoint, strategy.driver))
        replayed = needs_recovery and not strategy.skips_journal
        result.ok = True
        result.strategy = strategy.name
        result.driver = strategy.driver
        result.options = list(strategy.options)
        # ext tells us whether its journal needed replay; other filesystems do not,
        # so skipping their log is reported as possibly stale.
        result.stale_view = strategy.skips_journal and (needs_recovery or fstype not in EXT_TYPES)
        result.journal_replayed = replayed
        result.tried.append({"strategy": strategy.name, "error": ""})
        result.note = _note(strategy, fstype, replayed=replayed, readonly=readonly)
        return result
    result.error = "all mount strategies failed: " + "; ".join(
        f"{t['strategy']}: {t['error']}" for t in result.tried
    )
    return result
