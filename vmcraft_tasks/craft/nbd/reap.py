"""Release an attach from its state directory alone: what a restarted worker calls."""

from __future__ import annotations

import os
import shutil

from vmcraft_tasks.craft import mountinfo
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.nbd.base import ATTACH_FILE, AttachedDisk
from vmcraft_tasks.craft.nbd.fuse import FuseNbdBackend


def attach_state_dirs(work_dir: str) -> list[str]:
    if not os.path.isdir(work_dir):
        return []
    return sorted(
        os.path.join(work_dir, name)
        for name in os.listdir(work_dir)
        if name.startswith("attach-") and os.path.isdir(os.path.join(work_dir, name))
    )


def release_state_dir(state_dir: str) -> None:
    """Unmount, detach and remove one attach, whichever backend made it."""
    if not os.path.isdir(state_dir):
        return
    backend_name = "fuse"
    if os.path.exists(os.path.join(state_dir, ATTACH_FILE)):
        disk = AttachedDisk.load(state_dir)
        backend_name = disk.backend
        if backend_name == "kernel":
            from vmcraft_tasks.craft.nbd.kernel import KernelNbdBackend

            for mountpoint in mountinfo.mounts_under(state_dir):
                mountinfo.unmount(mountpoint)
            KernelNbdBackend().detach(disk)
            if mountinfo.mounts_under(state_dir):
                raise VMCraftError(f"{state_dir}: still mounted after release")
            shutil.rmtree(state_dir, ignore_errors=True)
            return
    # The FUSE backend's record names every helper and loop device; it also copes
    # with an attach killed before its attach record was written.
    FuseNbdBackend().release(state_dir)
