"""FUSE backend: qemu-nbd on a private unix socket, nbdfuse exposing the disk as a
file, one loop device per partition.

Needs no nbd kernel module and no kernel partition-table parsing, which is why it
runs on development and CI machines. Helpers run in their own session, so the
death of the task that attached the disk does not take a mounted disk down with
it; their pids are recorded for cleanup.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Any

from vmcraft_tasks.craft import commands, mountinfo
from vmcraft_tasks.craft.errors import (
    AttachError,
    BackendUnavailableError,
    TransientAttachError,
)
from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.nbd import helpers, loopdev
from vmcraft_tasks.craft.nbd.base import AttachBackend, AttachedDisk
from vmcraft_tasks.craft.nbd.helpers import AttachResources
from vmcraft_tasks.craft.partitions import Partition

QEMU_NBD_LOG = "qemu-nbd.log"
NBDFUSE_LOG = "nbdfuse.log"

# qemu-nbd's complaints that mean the image itself is unusable: retrying cannot help.
PERMANENT_QEMU_NBD_ERRORS = (
    "could not open",
    "unknown driver",
    "image is not in",
    "invalid",
    "no such file",
    "permission denied",
    "not supported",
    # qemu could not build the (snapshot) graph for this image, e.g. a size beyond its
    # limits: another attempt fails the same way.
    "failed to blk_new_open",
)


def qemu_nbd_argv(image: ImageInfo, socket: str, pid_file: str, *, readonly: bool) -> list[str]:
    """The qemu-nbd command for one attach (pure).

    Read-only attaches export a throw-away overlay (`--snapshot`): the export is
    writable so a guest journal can be replayed, but the writes land in the overlay
    and the source stays byte-identical. The image is the pinned block graph of its
    check (`ImageInfo.qemu_filename()`), never a bare name qemu-nbd would interpret.
    """
    argv = [
        "qemu-nbd",
        f"--socket={socket}",
        f"--format={image.format}",
        "--persistent",
        "--shared=8",
        "--cache=writeback",
        "--aio=threads",
        f"--pid-file={pid_file}",
    ]
    if readonly:
        argv.append("--snapshot")
    argv.append(image.qemu_filename())
    return argv


def nbdfuse_argv(fuse_file: str, socket: str, pid_file: str) -> list[str]:
    return ["nbdfuse", "-P", pid_file, fuse_file, "--unix", socket]


def classify_helper_exit(program: str, stderr: str) -> AttachError:
    """Decide whether a helper that died early is worth another attempt (pure)."""
    lower = stderr.lower()
    reason = f"{program} exited early: {stderr.strip() or 'no message'}"
    if program == "qemu-nbd" and any(word in lower for word in PERMANENT_QEMU_NBD_ERRORS):
        return AttachError("", reason)
    return TransientAttachError("", reason)


def _read_tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-limit:]
    except FileNotFoundError:
        return ""


def _wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


class FuseNbdBackend(AttachBackend):
    name = "fuse"

    def __init__(self, *, start_timeout_s: float = 10.0, stop_timeout_s: float = 10.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._loop_lock = threading.Lock()

    @staticmethod
    def check_available() -> None:
        missing = [
            p for p in ("qemu-nbd", "nbdfuse", "losetup", "fusermount3") if not shutil.which(p)
        ]
        if missing:
            raise BackendUnavailableError("", f"fuse backend needs {', '.join(missing)}")
        if not os.path.exists("/dev/fuse"):
            raise BackendUnavailableError("", "fuse backend needs /dev/fuse")

    def attach(self, image: ImageInfo, *, readonly: bool, state_dir: str) -> AttachedDisk:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        socket = os.path.join(state_dir, "nbd.sock")
        fuse_file = os.path.join(state_dir, "disk")
        res = AttachResources(socket=socket, fuse_file=fuse_file)
        disk = AttachedDisk(
            backend=self.name,
            image=image,
            readonly=readonly,
            disk_path=fuse_file,
            state_dir=state_dir,
        )
        try:
            res.qemu_nbd_pid = self._start_qemu_nbd(image, socket, state_dir, readonly=readonly)
            res.save(state_dir)
            res.nbdfuse_pid = self._start_nbdfuse(fuse_file, socket, state_dir, image.virtual_size)
            res.save(state_dir)
        except AttachError as exc:
            self.release(state_dir)
            exc.image = image.path
            raise
        except BaseException:
            self.release(state_dir)
            raise
        disk.helper_pids = [p for p in (res.qemu_nbd_pid, res.nbdfuse_pid) if p]
        return disk

    def _start_qemu_nbd(
        self, image: ImageInfo, socket: str, state_dir: str, *, readonly: bool
    ) -> int:
        pid_file = os.path.join(state_dir, "qemu-nbd.pid")
        log_path = os.path.join(state_dir, QEMU_NBD_LOG)
        proc = commands.spawn_detached(
            qemu_nbd_argv(image, socket, pid_file, readonly=readonly), stderr_path=log_path
        )
        ready = _wait_for(
            lambda: (
                (os.path.exists(socket) and os.path.exists(pid_file)) or proc.poll() is not None
            ),
            self.start_timeout_s,
        )
        if proc.poll() is not None:
            raise classify_helper_exit("qemu-nbd", _read_tail(log_path))
        if not ready:
            helpers.terminate(proc.pid, socket)
            raise TransientAttachError(
                "", f"qemu-nbd socket not ready after {self.start_timeout_s}s"
            )
        return proc.pid

    def _start_nbdfuse(self, fuse_file: str, socket: str, state_dir: str, size: int) -> int:
        pid_file = os.path.join(state_dir, "nbdfuse.pid")
        log_path = os.path.join(state_dir, NBDFUSE_LOG)
        # nbdfuse mounts over a regular file ("naked" mountpoint): no extra directory.
        with open(fuse_file, "w"):
            pass
        proc = commands.spawn_detached(
            nbdfuse_argv(fuse_file, socket, pid_file), stderr_path=log_path
        )
        ready = _wait_for(
            lambda: os.path.exists(pid_file) or proc.poll() is not None, self.start_timeout_s
        )
        if proc.poll() is not None:
            raise classify_helper_exit("nbdfuse", _read_tail(log_path))
        if not ready or os.path.getsize(fuse_file) != size:
            # Record the pid first so release() can unmount what did start.
            res = AttachResources.load(state_dir)
            res.nbdfuse_pid = proc.pid
            res.save(state_dir)
            raise TransientAttachError("", "nbdfuse did not expose the disk in time")
        return proc.pid

    def partition_device(self, disk: AttachedDisk, partition: Partition) -> str:
        # Several worker processes of a host may share one attach: the record is
        # the single truth, read and extended under its lock.
        with self._loop_lock, AttachResources.locked(disk.state_dir):
            res = AttachResources.load(disk.state_dir)
            known = res.loop_devices.get(str(partition.number))
            if known and helpers.loop_backing_file(known) == disk.disk_path:
                return known
            device = loopdev.attach_loop(
                disk.disk_path, partition.offset_bytes, partition.size_bytes
            )
            res.loop_devices[str(partition.number)] = device
            res.save(disk.state_dir)
        return device

    def known_partition_devices(self, disk: AttachedDisk) -> dict[int, str]:
        res = AttachResources.load(disk.state_dir)
        return {int(n): dev for n, dev in res.loop_devices.items()}

    def release_partition_devices(self, disk: AttachedDisk) -> None:
        with self._loop_lock, AttachResources.locked(disk.state_dir):
            res = AttachResources.load(disk.state_dir)
            self._release_loops(res)
            res.save(disk.state_dir)

    @staticmethod
    def _release_loops(res: AttachResources) -> None:
        if not res.fuse_file:
            return
        for number, device in list(res.loop_devices.items()):
            helpers.detach_loop(device, res.fuse_file)
            del res.loop_devices[number]

    def detach(self, disk: AttachedDisk) -> None:
        self.release(disk.state_dir)

    def release(self, state_dir: str) -> None:
        """Release everything recorded in `state_dir` and remove it; idempotent.

        Also what a restarted worker calls on a directory a killed one left behind.
        """
        if not os.path.isdir(state_dir):
            return
        res = AttachResources.load(state_dir)
        # Guest filesystems mounted inside the state directory must go first: the
        # loop devices under them cannot be released while they are mounted.
        for mountpoint in mountinfo.mounts_under(state_dir):
            if mountpoint != res.fuse_file:
                mountinfo.unmount(mountpoint)
        self._release_loops(res)
        if res.fuse_file and mountinfo.is_mountpoint(res.fuse_file):
            mountinfo.unmount(res.fuse_file)
        marker = res.socket or state_dir
        for pid in (res.nbdfuse_pid, res.qemu_nbd_pid):
            # nbdfuse exits by itself once unmounted; qemu-nbd (--persistent) never does.
            grace = 0.5 if pid == res.nbdfuse_pid else 0
            if pid and not helpers.wait_gone(pid, grace):
                helpers.terminate(pid, marker, self.stop_timeout_s)
        leftover = mountinfo.mounts_under(state_dir)
        if leftover:
            # Never recurse into a mounted guest filesystem.
            raise AttachError(res.fuse_file or state_dir, f"still mounted: {', '.join(leftover)}")
        shutil.rmtree(state_dir, ignore_errors=True)
