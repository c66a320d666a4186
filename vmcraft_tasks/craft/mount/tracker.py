"""Every mount we make is tracked, and released deepest first."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from vmcraft_tasks.craft import mountinfo
from vmcraft_tasks.craft.errors import CommandError, MountError


@dataclass(frozen=True)
class TrackedMount:
    device: str
    mountpoint: str
    driver: str


def unmount_order(mountpoints: list[str]) -> list[str]:
    """Deepest first, so no parent is unmounted while a child still sits on it (pure)."""
    return sorted(mountpoints, key=lambda m: (m.rstrip("/").count("/"), m), reverse=True)


class MountTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mounts: dict[str, TrackedMount] = {}

    def add(self, mount: TrackedMount) -> None:
        with self._lock:
            self._mounts[os.path.realpath(mount.mountpoint)] = mount

    def mounts(self) -> list[TrackedMount]:
        with self._lock:
            return list(self._mounts.values())

    def is_tracked(self, mountpoint: str) -> bool:
        with self._lock:
            return os.path.realpath(mountpoint) in self._mounts

    def umount(self, mountpoint: str) -> None:
        key = os.path.realpath(mountpoint)
        with self._lock:
            mount = self._mounts.get(key)
        if mount is None:
            raise MountError("", mountpoint, "not mounted by this VMCraft")
        mountinfo.unmount(key)
        with self._lock:
            self._mounts.pop(key, None)

    def umount_all(self) -> list[str]:
        """Unmount everything tracked, deepest first; returns what could not be unmounted."""
        failed = []
        with self._lock:
            order = unmount_order(list(self._mounts))
        for mountpoint in order:
            try:
                mountinfo.unmount(mountpoint)
            except CommandError:
                failed.append(mountpoint)
                continue
            with self._lock:
                self._mounts.pop(mountpoint, None)
        return failed
