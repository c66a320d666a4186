"""Pick the attach backend: the kernel path where the nbd module is usable, else FUSE."""

from __future__ import annotations

import functools
import os

from vmcraft_tasks.craft.errors import BackendUnavailableError
from vmcraft_tasks.craft.nbd.base import AttachBackend
from vmcraft_tasks.craft.nbd.fuse import FuseNbdBackend


def kernel_nbd_usable(sysfs_root: str = "/sys") -> bool:
    try:
        with open(os.path.join(sysfs_root, "module/nbd/parameters/max_part")) as fh:
            return int(fh.read().strip() or 0) > 0
    except (OSError, ValueError):
        return False


@functools.cache
def _check_fuse_once() -> None:
    # A PATH scan per attach adds up in a fleet: each step resumes the attach.
    FuseNbdBackend.check_available()


def make_backend(name: str) -> AttachBackend:
    if name == "auto":
        name = "kernel" if kernel_nbd_usable() else "fuse"
    if name == "fuse":
        _check_fuse_once()
        return FuseNbdBackend()
    if name == "kernel":
        from vmcraft_tasks.craft.nbd.kernel import KernelNbdBackend

        backend = KernelNbdBackend()
        backend.check_available()
        return backend
    raise BackendUnavailableError("", f"unknown backend {name!r}")
