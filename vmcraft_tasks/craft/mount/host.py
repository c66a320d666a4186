"""What the host kernel can mount (edge: reads /proc and /lib/modules)."""

from __future__ import annotations

import functools
import os

from vmcraft_tasks.craft.mount.plan import parse_modules_list, parse_proc_filesystems


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


@functools.cache
def kernel_filesystems() -> frozenset[str]:
    names = parse_proc_filesystems(_read("/proc/filesystems"))
    moddir = os.path.join("/lib/modules", os.uname().release)
    for listing in ("modules.dep", "modules.builtin"):
        names |= parse_modules_list(_read(os.path.join(moddir, listing)))
    return frozenset(names)
