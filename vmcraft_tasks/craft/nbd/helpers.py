"""Helper processes and loop devices owned by an attach: record, verify, release.

Everything the FUSE backend creates is written to `resources.json` in the attach's
private state directory the moment it exists, so a process that finds the
directory later (a restarted worker, a test's leak check) can release exactly
what was created, by id, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from vmcraft_tasks.craft import atomicfile
from vmcraft_tasks.craft.nbd import loopdev

RESOURCES_FILE = "resources.json"
RESOURCES_LOCK = "resources.lock"


@dataclass
class AttachResources:
    qemu_nbd_pid: int | None = None
    nbdfuse_pid: int | None = None
    fuse_file: str | None = None
    socket: str | None = None
    # partition number (as text: JSON keys) -> loop device
    loop_devices: dict[str, str] = field(default_factory=dict)

    def save(self, state_dir: str) -> None:
        path = os.path.join(state_dir, RESOURCES_FILE)
        atomicfile.atomic_write(path, json.dumps(asdict(self)), fsync=False)

    @staticmethod
    @contextlib.contextmanager
    def locked(state_dir: str) -> Iterator[None]:
        """Serialise read-modify-write of the record across worker processes of a host."""
        with atomicfile.locked(os.path.join(state_dir, RESOURCES_LOCK)):
            yield

    @classmethod
    def load(cls, state_dir: str) -> AttachResources:
        try:
            with open(os.path.join(state_dir, RESOURCES_FILE)) as fh:
                return cls(**json.load(fh))
        except FileNotFoundError:
            return cls()


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def process_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def owns_process(pid: int, marker: str) -> bool:
    """A recorded pid is ours only if its command line still names our socket/file.

    Pids are reused; checking the marker keeps us from signalling a stranger.
    """
    return process_alive(pid) and any(marker in arg for arg in process_cmdline(pid))


def reap_child(pid: int) -> None:
    """Collect the exit status if `pid` is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _reap_zombie(pid: int, timeout_s: float = 1.0) -> None:
    """Collect a child that shows as a zombie. A multi-threaded helper shows Z while its
    other threads still exit, and waitpid cannot collect it until they have."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            return  # not our child, or already collected
        if done == pid or time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reap_child(pid)
        if not process_alive(pid):
            _reap_zombie(pid)
            return True
        time.sleep(0.005)
    reap_child(pid)
    gone = not process_alive(pid)
    if gone:
        _reap_zombie(pid)
    return gone


def terminate(pid: int, marker: str, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one process we own; never by name."""
    if not owns_process(pid, marker):
        reap_child(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_gone(pid, timeout_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_gone(pid, timeout_s)


def loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def detach_loop(device: str, backing_file: str) -> None:
    """Detach a loop device only while it still points at our file (numbers are reused)."""
    if loop_backing_file(device) == backing_file:
        loopdev.detach_loop_device(device)
