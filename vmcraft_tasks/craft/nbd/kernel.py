"""The production attach backend: `qemu-nbd --connect /dev/nbdN` on the kernel NBD driver.

Everything the backend decides is read from sysfs and /dev under configurable roots and
every command goes through an injectable runner, so the decisions are unit-tested against
a fake tree on hosts without the nbd module.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Protocol

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import (
    AttachError,
    BackendUnavailableError,
    CommandError,
    PartitionError,
    TransientAttachError,
)
from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.nbd.base import AttachBackend, AttachedDisk
from vmcraft_tasks.craft.partitions import Partition

log = logging.getLogger(__name__)

PID_FILE_NAME = "qemu-nbd.pid"
BLOCKDEV_TIMEOUT_S = 30.0
MODPROBE_HINT = "modprobe nbd max_part=16"
HOST = "(kernel nbd backend)"  # stands in for the image name when no image is involved yet

_DEVICE_NAME = re.compile(r"^nbd(\d+)$")


class Runner(Protocol):
    """The slice of `commands.run` this backend uses; tests pass a fake."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = ...,
        ok_codes: Sequence[int] = ...,
    ) -> commands.CommandResult: ...


@dataclass(frozen=True)
class NbdDeviceState:
    """What sysfs says about one /dev/nbdN."""

    name: str  # "nbd3"
    pid_present: bool  # <sysfs>/block/nbdN/pid exists: a process is serving the device
    pid: int | None  # its value when readable
    size_sectors: int | None  # <sysfs>/block/nbdN/size; None when unreadable

    @property
    def number(self) -> int:
        return device_number(self.name)

    @property
    def free(self) -> bool:
        # Both conditions: the pid appears only once NBD_DO_IT runs, while the size is
        # set earlier by NBD_SET_SIZE and cleared late on disconnect, so either one alone
        # has a window in which a device that is being set up or torn down looks free.
        return not self.pid_present and self.size_sectors == 0


def device_number(name: str) -> int:
    """7 for "nbd7"; raises ValueError for anything that is not an nbd device name."""
    match = _DEVICE_NAME.match(name)
    if not match:
        raise ValueError(f"not an nbd device name: {name!r}")
    return int(match.group(1))


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_device_states(sysfs_root: str) -> list[NbdDeviceState]:
    """State of every nbdN under `<sysfs_root>/block`, sorted by device number."""
    block = os.path.join(sysfs_root, "block")
    try:
        names = [n for n in os.listdir(block) if _DEVICE_NAME.match(n)]
    except OSError:
        return []
    states = []
    for name in names:
        pid_path = os.path.join(block, name, "pid")
        states.append(
            NbdDeviceState(
                name=name,
                pid_present=os.path.exists(pid_path),
                pid=_read_int(pid_path),
                size_sectors=_read_int(os.path.join(block, name, "size")),
            )
        )
    return sorted(states, key=lambda s: s.number)


def pick_free_device(states: Iterable[NbdDeviceState]) -> str | None:
    """Name of the lowest-numbered free device ("nbd2" before "nbd10"), or None (pure)."""
    for state in sorted(states, key=lambda s: s.number):
        if state.free:
            return state.name
    return None


def build_connect_argv(
    device: str,
    image: ImageInfo,
    *,
    readonly: bool,
    pid_file: str,
    cache_mode: str,
) -> list[str]:
    """The `qemu-nbd --connect` command line (pure)."""
    argv = [
        "qemu-nbd",
        f"--connect={device}",
        # Always name the probed format: letting qemu guess would let a raw image whose
        # first bytes look like a qcow2 header point qemu at arbitrary backing files.
        f"--format={image.format}",
        f"--cache={cache_mode}",
    ]
    if readonly:
        # A throw-away overlay instead of --read-only: mounting a dirty ext4/xfs replays
        # its journal, which needs a writable device; the writes land in the overlay and
        # never reach the source image.
        argv.append("--snapshot")
    # No --fork: with --connect qemu-nbd daemonises by itself and the parent exits only
    # once the kernel accepted the socket (or with the child's error message).
    # The image is the pinned block graph of its check, never a bare name qemu-nbd
    # would reinterpret (backing files, extents, data files, protocols).
    argv += [f"--pid-file={pid_file}", image.qemu_filename()]
    return argv


def classify_connect_error(image: str, device: str, exc: CommandError) -> AttachError:
    """Map a failed `qemu-nbd --connect` to the error the caller should act on (pure).

    Transient: anything meaning "the device was taken or was not ready", which a retry
    on another device fixes. Everything about the image itself is permanent.
    """
    if exc.timed_out:
        return TransientAttachError(image, f"qemu-nbd --connect {device} timed out")
    if exc.returncode is None:
        return BackendUnavailableError(
            image, f"cannot run qemu-nbd ({exc.reason}): install qemu-utils"
        )
    text = exc.stderr.strip()
    lower = text.lower()
    if "busy" in lower:
        return TransientAttachError(image, f"{device} is busy: {text}")
    if "failed to set nbd socket" in lower:
        # qemu-nbd drops errno here; in practice it is EBUSY from NBD_SET_SOCK because
        # a process outside our lock connected the device between pick and connect.
        return TransientAttachError(image, f"{device} was taken by another process: {text}")
    if "failed to open /dev/nbd" in lower or f"failed to open {device.lower()}" in lower:
        if "permission denied" in lower or "operation not permitted" in lower:
            return AttachError(image, f"no permission to open {device} (run as root): {text}")
        return TransientAttachError(image, f"{device} could not be opened: {text}")
    return AttachError(image, f"qemu-nbd could not export the image: {text or exc}")


class KernelNbdBackend(AttachBackend):
    """Attach images as /dev/nbdN with partitions /dev/nbdNpM created by the kernel."""

    name = "kernel"

    def __init__(
        self,
        *,
        sysfs_root: str = "/sys",
        dev_root: str = "/dev",
        proc_root: str = "/proc",
        lock_path: str = "/run/lock/vmcraft-nbd.lock",
        connect_timeout_s: float = 10.0,
        settle_timeout_s: float = 5.0,
        poll_interval_s: float = 0.01,
        lock_timeout_s: float = 60.0,
        cache_mode: str = "writeback",
        runner: Runner = commands.run,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        kill: Callable[[int, int], None] = os.kill,
    ) -> None:
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.proc_root = proc_root
        self.lock_path = lock_path
        self.connect_timeout_s = connect_timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.poll_interval_s = poll_interval_s
        self.lock_timeout_s = lock_timeout_s
        # writeback, qemu-nbd's own default, rather than none: O_DIRECT fails on tmpfs and
        # many FUSE/NFS mounts where images live, and the kernel sends flushes that
        # qemu-nbd honours, so data written in write mode is on disk after detach.
        self.cache_mode = cache_mode
        self._run = runner
        self._sleep = sleep
        self._monotonic = monotonic
        self._kill = kill

    # ---- availability -------------------------------------------------------------

    def check_available(self) -> None:
        """Raise BackendUnavailableError, with the fix in the message, if we cannot run."""
        module = os.path.join(self.sysfs_root, "module", "nbd")
        if not os.path.isdir(module):
            raise BackendUnavailableError(
                HOST, f"nbd kernel module not loaded: run `{MODPROBE_HINT}`"
            )
        max_part = _read_int(os.path.join(module, "parameters", "max_part"))
        if max_part == 0:
            raise BackendUnavailableError(
                HOST,
                "nbd kernel module loaded without max_part: partitions would not appear; "
                f"reload with `modprobe -r nbd && {MODPROBE_HINT}`",
            )
        if not self._device_nodes():
            raise BackendUnavailableError(
                HOST,
                f"no {self.dev_root}/nbd* devices: load the module with "
                f"`{MODPROBE_HINT} nbds_max=16` or check that udev created the nodes",
            )

    def _device_nodes(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.dev_root) if _DEVICE_NAME.match(n)}
        except OSError:
            return set()

    # ---- attach -------------------------------------------------------------------

    def attach(self, image: ImageInfo, *, readonly: bool, state_dir: str) -> AttachedDisk:
        try:
            self.check_available()
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(image.path, exc.reason) from exc
        os.makedirs(state_dir, exist_ok=True)
        pid_file = os.path.join(state_dir, PID_FILE_NAME)
        # qemu-nbd leaves its pid file behind when it fails; a stale one would make us
        # treat an unrelated pid as our helper.
        _remove_quietly(pid_file)

        with self._host_lock(image.path):
            nodes = self._device_nodes()
            # A device without a /dev node cannot be connected, so it is not a candidate.
            states = [s for s in read_device_states(self.sysfs_root) if s.name in nodes]
            name = pick_free_device(states)
            if name is None:
                raise TransientAttachError(
                    image.path, f"no free nbd device (all {len(states)} busy)"
                )
            device = os.path.join(self.dev_root, name)
            argv = build_connect_argv(
                device, image, readonly=readonly, pid_file=pid_file, cache_mode=self.cache_mode
            )
            try:
                self._run(argv, timeout=self.connect_timeout_s)
            except CommandError as exc:
                error = classify_connect_error(image.path, device, exc)
                self._cleanup_failed_connect(name, pid_file)
                raise error from exc

            try:
                sysfs_pid = self._wait_connected(name)
            except BaseException:
                # Interrupted mid-wait (e.g. a task time limit): the device is ours and
                # connected, and nobody else knows it exists.
                self._cleanup_failed_connect(name, pid_file, connected=True)
                raise
            if sysfs_pid is None:
                # qemu-nbd said it connected, so whatever holds the device now is ours.
                self._cleanup_failed_connect(name, pid_file, connected=True)
                raise TransientAttachError(
                    image.path,
                    f"{device} did not come up within {self.settle_timeout_s:g}s "
                    "(no pid in sysfs); disconnected it",
                )

        helper = _read_int(pid_file) or sysfs_pid
        log.info("attached %s as %s (qemu-nbd pid %d)", image.path, device, helper)
        return AttachedDisk(
            backend=self.name,
            image=image,
            readonly=readonly,
            disk_path=device,
            state_dir=state_dir,
            helper_pids=[helper],
            nbd_device=device,
        )

    @contextmanager
    def _host_lock(self, image: str) -> Iterator[None]:
        """Hold the host-wide lock that makes "pick a free device + connect" atomic.

        Without it two processes read the same device as free and both connect it; the
        loser's qemu-nbd fails late, after the winner's partitions may already be in use.
        """
        lock_dir = os.path.dirname(self.lock_path)
        if lock_dir:
            os.makedirs(lock_dir, exist_ok=True)
        # O_CLOEXEC: a qemu-nbd daemon inheriting this descriptor would keep the host
        # lock for as long as the disk stays attached.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # Poll instead of blocking so a wedged holder costs a transient error, not a
            # task hung forever.
            deadline = self._monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._monotonic() >= deadline:
                        raise TransientAttachError(
                            image,
                            f"timed out after {self.lock_timeout_s:g}s waiting for "
                            f"the host nbd lock {self.lock_path}",
                        ) from None
                    self._sleep(self.poll_interval_s)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _wait_connected(self, name: str) -> int | None:
        """The serving pid once sysfs shows the device up (pid and size), else None."""
        found: list[int] = []

        def connected() -> bool:
            state = self._state(name)
            if state.pid_present and state.pid is not None and (state.size_sectors or 0) > 0:
                found.append(state.pid)
                return True
            return False

        return found[-1] if self._wait_for(connected, self.settle_timeout_s) else None

    def _cleanup_failed_connect(self, name: str, pid_file: str, *, connected: bool = False) -> None:
        """Leave nothing behind from a failed attempt, and touch nothing that is not ours."""
        device = os.path.join(self.dev_root, name)
        helper = _read_int(pid_file)
        owner = self._state(name).pid
        ours = connected or (
            helper is not None and owner is not None and self._same_process(owner, [helper])
        )
        if ours:
            try:
                self._disconnect(device)
            except CommandError as exc:
                log.warning("cleanup: %s", exc)
            self._wait_for(lambda: not self._state(name).pid_present, self.settle_timeout_s)
        if helper is not None:
            self._terminate_helper(helper, device)
        _remove_quietly(pid_file)

    # ---- partitions ---------------------------------------------------------------

    def partition_device(self, disk: AttachedDisk, partition: Partition) -> str:
        device = self._device_of(disk)
        path = f"{device}p{partition.number}"
        # The kernel creates the partition, but udev creates the node a moment later.
        if not self._wait_for(lambda: os.path.exists(path), self.settle_timeout_s):
            raise AttachError(
                disk.image.path,
                f"{path} did not appear within {self.settle_timeout_s:g}s "
                "(is udev running, and was nbd loaded with max_part?)",
            )
        return path

    def release_partition_devices(self, disk: AttachedDisk) -> None:
        """Nothing to do: the kernel owns /dev/nbdNpM and drops them itself."""

    def reread_partitions(self, disk: AttachedDisk) -> None:
        device = self._device_of(disk)
        try:
            self._run(["blockdev", "--rereadpt", device], timeout=BLOCKDEV_TIMEOUT_S)
        except CommandError as exc:
            raise PartitionError(f"cannot re-read the partition table of {device}: {exc}") from exc

    # ---- detach -------------------------------------------------------------------

    def detach(self, disk: AttachedDisk) -> None:
        if disk.nbd_device is None:
            return
        device = disk.nbd_device
        name = os.path.basename(device)
        state = self._state(name)
        if state.pid_present:
            if state.pid is None or self._same_process(state.pid, disk.helper_pids):
                self._disconnect_and_wait(disk, name)
            else:
                # Detached earlier and since reused: disconnecting now would pull the disk
                # from under whoever attached it after us.
                log.info(
                    "detach: %s now served by pid %s, not ours %s; leaving it",
                    device,
                    state.pid,
                    disk.helper_pids,
                )
        for pid in disk.helper_pids:
            self._terminate_helper(pid, device)
        _remove_quietly(os.path.join(disk.state_dir, PID_FILE_NAME))

    def _disconnect_and_wait(self, disk: AttachedDisk, name: str) -> None:
        device = os.path.join(self.dev_root, name)
        try:
            self._disconnect(device)
        except CommandError as exc:
            log.warning("detach: %s", exc)
        if self._wait_for(lambda: not self._state(name).pid_present, self.settle_timeout_s):
            return
        # The NBD_DISCONNECT did not take; ending the server closes the socket, which
        # makes the kernel drop the device.
        for pid in disk.helper_pids:
            self._terminate_helper(pid, device)
        if not self._wait_for(lambda: not self._state(name).pid_present, self.settle_timeout_s):
            raise AttachError(disk.image.path, f"{device} is still connected after detach")

    def _disconnect(self, device: str) -> None:
        self._run(["qemu-nbd", "--disconnect", device], timeout=self.connect_timeout_s)

    # ---- helpers ------------------------------------------------------------------

    def _device_of(self, disk: AttachedDisk) -> str:
        if disk.nbd_device is None:
            raise AttachError(disk.image.path, "not attached by the kernel backend")
        return disk.nbd_device

    def _state(self, name: str) -> NbdDeviceState:
        base = os.path.join(self.sysfs_root, "block", name)
        pid_path = os.path.join(base, "pid")
        return NbdDeviceState(
            name=name,
            pid_present=os.path.exists(pid_path),
            pid=_read_int(pid_path),
            size_sectors=_read_int(os.path.join(base, "size")),
        )

    def _wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = self._monotonic() + timeout_s
        while True:
            if predicate():
                return True
            if self._monotonic() >= deadline:
                return False
            self._sleep(self.poll_interval_s)

    def _tgid(self, pid: int) -> int | None:
        text = _read_text(os.path.join(self.proc_root, str(pid), "status"))
        for line in (text or "").splitlines():
            if line.startswith("Tgid:"):
                try:
                    return int(line.split()[1])
                except (IndexError, ValueError):
                    return None
        return None

    def _same_process(self, sysfs_pid: int, helper_pids: Sequence[int]) -> bool:
        """Whether the pid sysfs reports belongs to one of our helpers.

        sysfs names the thread that runs NBD_DO_IT, while the pid file names the
        process, so compare thread-group ids as well.
        """
        if not helper_pids:
            return True  # nothing recorded to compare with; the caller says it is ours
        return sysfs_pid in helper_pids or self._tgid(sysfs_pid) in helper_pids

    def _terminate_helper(self, pid: int, device: str) -> None:
        """SIGTERM `pid` only while it is still our qemu-nbd for `device`.

        The command line is checked because after the helper exits its pid can be
        reused by an unrelated process.
        """
        raw = _read_text(os.path.join(self.proc_root, str(pid), "cmdline"))
        if not raw:
            return  # gone, or a zombie
        args = [a for a in raw.split("\0") if a]
        if not args or not os.path.basename(args[0]).startswith("qemu-nbd"):
            return
        # Exact forms only: a substring test would match /dev/nbd1 inside /dev/nbd10.
        if not any(a in (device, f"--connect={device}", f"-c{device}") for a in args[1:]):
            return
        try:
            self._kill(pid, signal.SIGTERM)
            log.info("sent SIGTERM to qemu-nbd pid %d for %s", pid, device)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise


def _remove_quietly(path: str) -> None:
    with suppress(FileNotFoundError):
        os.remove(path)
