"""The attach backend interface shared by the kernel and FUSE backends."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

from vmcraft_tasks.craft.atomicfile import atomic_write
from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.partitions import Partition

ATTACH_FILE = "attach.json"


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image"] = self.image.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttachedDisk:
        fields = dict(data)
        fields["image"] = ImageInfo.from_dict(fields["image"])
        return cls(**fields)

    def save(self) -> None:
        """Record the attach in its state directory, for other processes of this host."""
        atomic_write(
            os.path.join(self.state_dir, ATTACH_FILE), json.dumps(self.to_dict()), fsync=False
        )

    @classmethod
    def load(cls, state_dir: str) -> AttachedDisk:
        with open(os.path.join(state_dir, ATTACH_FILE)) as fh:
            return cls.from_dict(json.load(fh))


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

    def known_partition_devices(self, disk: AttachedDisk) -> dict[int, str]:
        """Partition devices already exposed for this attach (by any process)."""
        return {}

    def reread_partitions(self, disk: AttachedDisk) -> None:
        """Make the host see a changed partition table."""
        self.release_partition_devices(disk)
