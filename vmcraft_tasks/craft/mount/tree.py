"""The guest's filesystem tree as the guest itself mounts it: /boot, /var, ... inside /.

Every filesystem is first mounted on its own private mountpoint. Fixes that edit
/boot/grub/grub.cfg and a sandboxed initramfs generator that writes
/boot/initrd.img-K need the guest's own layout, so the guest's fstab decides which
of those mounts are bound where inside the root mount. Where each bind lands is
resolved inside the guest root (GuestFS), so a guest symlink such as
`/boot -> /etc` can never turn a bind into a mount over a host directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError, GuestPathError, MountError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.fstab import ResolvedFstabEntry
from vmcraft_tasks.craft.mount.tracker import MountTracker, TrackedMount

BIND_TIMEOUT_S = 30.0
# Filesystems a guest mounts from a partition of its own disk at a real directory.
_NOT_A_TREE_MOUNT = frozenset({"swap", "none"})


@dataclass(frozen=True)
class TreeMount:
    """One guest filesystem to bind at `guest_path` inside the root mount."""

    guest_path: str  # /boot, /var, /boot/efi ...
    partition: int
    source: str  # the host mountpoint where that partition is already mounted


def tree_mounts(
    fstab: Sequence[ResolvedFstabEntry], mounted: Mapping[int, str], *, root_partition: int
) -> tuple[list[TreeMount], list[str]]:
    """Which mounted partitions go where inside the root, parents first (pure).

    `mounted` maps partition numbers to the host mountpoints where they are mounted.
    Returns the binds and notes on fstab entries of this disk that cannot be placed.
    """
    binds: list[TreeMount] = []
    notes: list[str] = []
    for resolved in fstab:
        entry = resolved.entry
        number = resolved.resolved_partition
        if resolved.kind != "device" or number is None or number == root_partition:
            continue
        if entry.fstype in _NOT_A_TREE_MOUNT or not entry.mountpoint.startswith("/"):
            continue
        path = "/" + "/".join(part for part in entry.mountpoint.split("/") if part)
        if path == "/" or ".." in path.split("/"):
            notes.append(f"fstab mountpoint {entry.mountpoint!r} is not a place in the tree")
            continue
        if number not in mounted:
            notes.append(f"{path}: partition {number} is not mounted")
            continue
        binds.append(TreeMount(path, number, mounted[number]))
    binds.sort(key=lambda bind: (bind.guest_path.count("/"), bind.guest_path))
    return binds, notes


def assemble(root: str, binds: Sequence[TreeMount], tracker: MountTracker) -> list[str]:
    """Bind each filesystem at its place inside the root mount `root` (edge).

    Returns notes for binds that could not be made (a place that is missing or not a
    directory in the guest); mounts that were made are tracked, so the usual
    deepest-first unmount releases them.
    """
    fs = GuestFS(root)
    notes = []
    for bind in binds:
        try:
            target = fs.resolve(bind.guest_path)
        except GuestPathError as exc:
            notes.append(f"{bind.guest_path}: {exc.reason}")
            continue
        if not fs.is_dir(bind.guest_path):
            notes.append(f"{bind.guest_path}: not a directory in the guest root")
            continue
        try:
            commands.run(["mount", "--bind", bind.source, target], timeout=BIND_TIMEOUT_S)
        except CommandError as exc:
            raise MountError(bind.source, target, exc.stderr_tail or str(exc)) from exc
        tracker.add(TrackedMount(bind.source, target, "bind"))
    return notes
