"""Snapshots of host resources our code may create, to prove none leaked.

Listing processes by name is fine; killing by name is not: these helpers only look.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmcraft_tasks.craft import commands

HELPER_PROGRAMS = ("qemu-nbd", "nbdfuse", "ntfs-3g", "fusefat")


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
        return frozenset(line.split()[4] for line in fh)


def _loops() -> frozenset[str]:
    out = commands.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], timeout=30).stdout
    return frozenset(" ".join(line.split()) for line in out.splitlines() if line.strip())


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
        if name in HELPER_PROGRAMS and state != "Z":
            found.add(f"{pid}:{name}")
    return frozenset(found)


def snapshot() -> HostSnapshot:
    return HostSnapshot(mounts=_mounts(), loops=_loops(), helpers=_helpers())
