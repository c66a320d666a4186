"""The host's mount table: what is mounted where, and unmounting one path (edge)."""

from __future__ import annotations

import contextlib
import os
import time

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError

UMOUNT_TIMEOUT_S = 60.0


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def _mountinfo_points() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        # Field 5 is the mount point, with spaces and the like octal-escaped.
        return [_unescape(line.split()[4]) for line in fh if len(line.split()) > 4]


def sources_under(directory: str) -> dict[str, str]:
    """{mount point: source} for every mount inside `directory`, from one read."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4 and "-" in fields[6:]:
                point = _unescape(fields[4])
                if point.startswith(prefix):
                    found[point] = _unescape(fields[fields.index("-", 6) + 2])
    return found


def source_of(mountpoint: str) -> str:
    """The mount source (device) of a mount point, or "" when not mounted."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target and "-" in fields:
                return _unescape(fields[fields.index("-", 6) + 2])
    return ""


def is_mountpoint(path: str) -> bool:
    return os.path.realpath(path) in _mountinfo_points()


def mounts_under(directory: str) -> list[str]:
    """Mount points inside `directory` (not the directory itself), deepest first."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    inside = [m for m in _mountinfo_points() if m.startswith(prefix)]
    return sorted(set(inside), key=lambda m: m.count("/"), reverse=True)


def unmount(path: str) -> None:
    """Unmount one path we mounted; retried once, lazily as a last resort."""
    if not is_mountpoint(path):
        return
    try:
        commands.run(["umount", path], timeout=UMOUNT_TIMEOUT_S)
    except CommandError:
        # A FUSE driver or a just-closed file may keep it busy for a moment.
        time.sleep(0.05)
        with contextlib.suppress(CommandError):
            commands.run(["umount", path], timeout=UMOUNT_TIMEOUT_S)
        if is_mountpoint(path):
            commands.run(["umount", "-l", path], timeout=UMOUNT_TIMEOUT_S)
