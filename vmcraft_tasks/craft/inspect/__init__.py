"""Operating-system inspection of a mounted guest root (the virt-inspector part of VMCraft).

`inspect_root` takes a directory where one guest filesystem is mounted plus what the
disk scan already knows (filesystems, partitions) and says which OS lives there.
All guest reads go through GuestFS, so guest symlinks cannot reach the host.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmcraft_tasks.craft.errors import GuestPathError, InspectError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.linux import inspect_linux
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect.windows import (
    SYSTEMROOT_CANDIDATES,
    inspect_windows,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import VolumeTable

__all__ = ["OSInfo", "inspect_root", "looks_like_os_root"]


def _looks_like_linux(fs: GuestFS) -> bool:
    if fs.is_file("/etc/os-release"):
        return True
    # Pre-os-release systems: an fstab plus somewhere programs live. /etc alone is
    # not enough, a separate /var or /home partition can contain an etc directory.
    return fs.is_file("/etc/fstab") and (fs.is_dir("/bin") or fs.is_dir("/usr"))


def _looks_like_windows(fs: GuestFS) -> bool:
    """`fs` must be case-insensitive: guests spell System32 several ways."""
    return any(fs.is_dir(f"{systemroot}/System32") for systemroot in SYSTEMROOT_CANDIDATES)


def looks_like_os_root(root: str) -> bool:
    """Cheap check that `root` holds an OS root (Linux /etc or a Windows directory)."""
    try:
        if _looks_like_linux(GuestFS(root)):
            return True
        return _looks_like_windows(GuestFS(root, case_insensitive=True))
    except GuestPathError:
        return False


def inspect_root(
    root: str,
    *,
    root_partition: int,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> OSInfo | None:
    """Inspect the guest filesystem mounted at `root`; None when it is not an OS root.

    `volumes`: the VM's volume table when `filesystems`/`partitions` are numbered
    VM-wide (several disks, LVs), so its fstab resolves across all of them.

    Raises InspectError when `root` itself is unusable (missing, not a directory).
    """
    try:
        fs = GuestFS(root)
        windows_fs = GuestFS(root, case_insensitive=True)
    except GuestPathError as exc:
        raise InspectError(f"cannot inspect {root}: {exc.reason}") from exc
    windows = inspect_windows(windows_fs, root_partition=root_partition)
    if windows is not None:
        return windows
    if _looks_like_linux(fs):
        return inspect_linux(
            fs,
            root_partition=root_partition,
            filesystems=filesystems,
            partitions=partitions,
            volumes=volumes,
        )
    if _looks_like_windows(windows_fs):
        # A Windows directory without cmd.exe: recovery partitions and damaged
        # installs look like this. Say so rather than guess a version.
        return OSInfo(
            root_partition=root_partition,
            type="unknown",
            notes=("Windows directory found but no System32/cmd.exe",),
        )
    return None
