"""Snapshots of host resources our code may create, to prove none leaked.

Listing processes by name is fine; killing by name is not: these helpers only look.
A snapshot counts only resources inside this test run's own directories (its
pytest base temp, work dir and sample builds), so a second run or a benchmark on
the same machine is not mistaken for a leak of this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmcraft_tasks.craft import commands

HELPER_PROGRAMS = (
    "qemu-nbd",
    "nbdfuse",
    "ntfs-3g",
    "fusefat",
    "nbdkit",
    "qemu-system-x86",
    "qemu-system-x86_64",
    "bwrap",
    "qemu-img",
)

# Directories this run owns; set once by the test session (conftest).
_scope: list[str] = []


def set_scope(*directories: str) -> None:
    """Count only resources under these directories from now on."""
    _scope[:] = [os.path.realpath(d).rstrip("/") + "/" for d in directories if d]


def _in_scope(text: str) -> bool:
    return not _scope or any(prefix in text + "/" for prefix in _scope)


@dataclass(frozen=True)
class HostSnapshot:
    mounts: frozenset[str]
    loops: frozenset[str]
    helpers: frozenset[str]

    def new_since(self, before: HostSnapshot) -> list[str]:
        leaks = [f"mount {m}" for m in sorted(self.mounts - before.mounts)]
        leaks += [f"loop {loop}" for loop in sorted(self.loops - before.loops)]
        leaks += [f"process {p}" for p in sorted(self.helpers - before.helpers)]
        return leaks


def _mounts() -> frozenset[str]:
    with open("/proc/self/mountinfo") as fh:
        return frozenset(point for line in fh if _in_scope(point := line.split()[4]))


def _orphaned(line: str) -> bool:
    """A loop device whose backing file's mount is gone (it shows as "/"): a FUSE disk file
    unmounted under it. No path names its owner any more, so any new one counts."""
    fields = line.split()
    return len(fields) == 2 and fields[1] == "/"


def _loops() -> frozenset[str]:
    out = commands.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], timeout=30).stdout
    return frozenset(
        " ".join(line.split())
        for line in out.splitlines()
        if line.strip() and (_in_scope(line) or _orphaned(line))
    )


def _helpers() -> frozenset[str]:
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        state = stat[stat.rfind(")") + 2 :].split()[0]
        if name in HELPER_PROGRAMS and state != "Z" and _in_scope(_cmdline(pid)):
            found.add(f"{pid}:{name}")
    return frozenset(found)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def snapshot() -> HostSnapshot:
    return HostSnapshot(mounts=_mounts(), loops=_loops(), helpers=_helpers())
