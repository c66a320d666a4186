"""Inspect a whole attached disk: scan, mount every filesystem privately, find OS roots."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmcraft_tasks.craft.errors import InspectError
from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.inspect import inspect_root, looks_like_os_root
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.mount.plan import UNMOUNTABLE_TYPES
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem, filesystem_from_blkid
from vmcraft_tasks.craft.volumes import VolumeTable


class AttachedGuest(Protocol):
    """What inspection needs of an attached disk (the `VMCraft` facade is one); a
    protocol, so the facade can call inspection without a circle between them."""

    @property
    def image(self) -> ImageInfo: ...
    @property
    def disk_device(self) -> str: ...
    @property
    def attach_attempts(self) -> int: ...
    @property
    def backend_name(self) -> str: ...
    @property
    def readonly(self) -> bool: ...
    def list_partitions(self, use_cache: bool = True) -> list[Partition]: ...
    def filesystems(self, use_cache: bool = True) -> list[Filesystem]: ...
    def device(self, partition_number: int) -> str: ...
    def blkid(self, device: int | str, use_cache: bool = True) -> dict[str, str]: ...
    def private_mountpoint(self, name: str) -> str: ...
    def mount_all_parallel(
        self, devices: Sequence[tuple[int | str, str]], max_workers: int = 4
    ) -> dict[str, MountResult]: ...


@dataclass
class DiskReport:
    image: dict[str, Any]
    backend: str
    attach_attempts: int
    readonly: bool
    partitions: list[Partition] = field(default_factory=list)
    filesystems: list[Filesystem] = field(default_factory=list)
    mounts: dict[int, MountResult] = field(default_factory=dict)
    roots: list[OSInfo] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "backend": self.backend,
            "attach_attempts": self.attach_attempts,
            "readonly": self.readonly,
            "partitions": [p.to_dict() for p in self.partitions],
            "filesystems": [f.to_dict() for f in self.filesystems],
            "mounts": {str(n): m.to_dict() for n, m in self.mounts.items()},
            "roots": [r.to_dict() for r in self.roots],
            "timings_ms": self.timings_ms,
        }


WHOLE_DISK = 0  # the "partition number" of a filesystem written straight onto the disk


def _whole_disk_filesystem(g: AttachedGuest) -> list[Filesystem]:
    """A disk without a partition table is either one filesystem or not a disk image."""
    tags = g.blkid(g.disk_device)
    if not tags.get("TYPE"):
        raise InspectError(
            f"{g.image.path}: no partition table and no filesystem found "
            f"(qemu-img reads it as {g.image.format}): not a disk image"
        )
    return [filesystem_from_blkid(WHOLE_DISK, tags)]


def _device(g: AttachedGuest, number: int) -> str:
    return g.disk_device if number == WHOLE_DISK else g.device(number)


def mountable(fs: Filesystem) -> bool:
    return fs.type is not None and fs.type not in UNMOUNTABLE_TYPES


def scan(g: AttachedGuest) -> tuple[list[Partition], list[Filesystem]]:
    """Partitions and filesystems of the disk (a bare filesystem counts as partition 0)."""
    parts = g.list_partitions()
    return parts, g.filesystems() if parts else _whole_disk_filesystem(g)


def private_mountpoint(g: AttachedGuest, number: int) -> str:
    return g.private_mountpoint(f"p{number}")


def mount_device(g: AttachedGuest, number: int) -> str:
    return _device(g, number)


def describe_filesystems(
    filesystems: list[Filesystem], mounts: dict[int, MountResult] | None = None
) -> str:
    """One line naming what the scan found on each partition (for a failure reason)."""
    described = []
    for fs in filesystems:
        what = fs.type or fs.content or "no filesystem"
        mount = (mounts or {}).get(fs.partition)
        if fs.type and mount is not None and not mount.ok:
            what += " (would not mount)"
        label = "whole disk" if fs.partition == WHOLE_DISK else f"partition {fs.partition}"
        described.append(f"{label}: {what}")
    return "; ".join(described) or "no partitions"


def find_roots(
    g: AttachedGuest,
    partitions: list[Partition],
    filesystems: list[Filesystem],
    mounts: dict[int, MountResult],
    volumes: VolumeTable | None = None,
) -> list[OSInfo]:
    """Inspect every mounted filesystem that looks like an OS root (pure reading).

    `volumes`: the VM's volume table when the numbers are VM-wide (see `craft.volumes`).
    """
    roots = []
    for number, result in sorted(mounts.items()):
        if not result.ok or not looks_like_os_root(result.mountpoint):
            continue
        info = inspect_root(
            result.mountpoint,
            root_partition=number,
            filesystems=filesystems,
            partitions=partitions,
            volumes=volumes,
        )
        if info is not None:
            roots.append(info)
    return roots


def inspect_disk(g: AttachedGuest, *, max_workers: int = 4) -> DiskReport:
    """Mount each filesystem read-only under the attach's private directory and inspect it.

    Mounts stay in place (tracked) until `umount_all()` or `shutdown()`, so the
    caller can read guest files from the roots it was given.
    """
    report = DiskReport(
        image=g.image.to_dict(),
        backend=g.backend_name,
        attach_attempts=g.attach_attempts,
        readonly=g.readonly,
    )
    t0 = time.perf_counter()
    report.partitions, report.filesystems = scan(g)
    t1 = time.perf_counter()
    targets = [fs.partition for fs in report.filesystems if mountable(fs)]
    pairs = [(mount_device(g, n), private_mountpoint(g, n)) for n in targets]
    results = g.mount_all_parallel(pairs, max_workers=max_workers)
    report.mounts = {n: results[mp] for n, (_dev, mp) in zip(targets, pairs, strict=True)}
    t2 = time.perf_counter()
    report.roots = find_roots(g, report.partitions, report.filesystems, report.mounts)
    t3 = time.perf_counter()
    report.timings_ms = {
        "scan": round((t1 - t0) * 1000, 2),
        "mount": round((t2 - t1) * 1000, 2),
        "inspect": round((t3 - t2) * 1000, 2),
    }
    return report
