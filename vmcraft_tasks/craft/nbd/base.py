"""The attach backend interface shared by the kernel and FUSE backends."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.partitions import Partition


@dataclass
class AttachedDisk:
    """A disk exposed on this host. Host-local state: never send it to another host."""

    backend: str
    image: ImageInfo
    readonly: bool
    disk_path: str  # whole-disk path readable by sfdisk/blkid (/dev/nbdN or the nbdfuse file)
    state_dir: str  # private directory holding sockets, pid files, helper logs
    helper_pids: list[int] = field(default_factory=list)
    nbd_device: str | None = None  # kernel backend only
    attempts: int = 1


class AttachBackend(ABC):
    """Expose an image as block devices, and take it down again.

    `attach` makes one attempt; the caller owns retry. A failed attempt must leave
    nothing behind before it raises.
    """

    name: str

    @abstractmethod
    def attach(self, image: ImageInfo, *, readonly: bool, state_dir: str) -> AttachedDisk: ...

    @abstractmethod
    def partition_device(self, disk: AttachedDisk, partition: Partition) -> str:
        """Block device for one partition, creating it if the backend must."""

    @abstractmethod
    def release_partition_devices(self, disk: AttachedDisk) -> None:
        """Drop per-partition devices (after the table changed, or before detach)."""

    @abstractmethod
    def detach(self, disk: AttachedDisk) -> None:
        """Release everything `attach` created; safe to call twice."""

    def reread_partitions(self, disk: AttachedDisk) -> None:
        """Make the host see a changed partition table."""
        self.release_partition_devices(disk)
