"""What inspecting one guest root found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vmcraft_tasks.craft.inspect.fstab import ResolvedFstabEntry

OSType = Literal["linux", "windows", "unknown"]


@dataclass(frozen=True)
class OSInfo:
    """One operating system root. Unknown facts are None, and `notes` says why."""

    root_partition: int  # partition number on THIS disk
    type: OSType
    distro: str | None = None  # libguestfs names: debian, rhel, rocky, windows, ...
    product_name: str | None = None
    major: int | None = None
    minor: int | None = None
    arch: str | None = None  # uname -m style: x86_64, aarch64, i386, ...
    hostname: str | None = None
    package_format: str | None = None  # deb, rpm, pacman, apk
    package_management: str | None = None  # apt, dnf, yum, zypper, pacman, apk, ...
    build: str | None = None  # Windows CurrentBuildNumber
    edition: str | None = None  # Windows EditionID
    fstab: tuple[ResolvedFstabEntry, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_partition": self.root_partition,
            "type": self.type,
            "distro": self.distro,
            "product_name": self.product_name,
            "major": self.major,
            "minor": self.minor,
            "arch": self.arch,
            "hostname": self.hostname,
            "package_format": self.package_format,
            "package_management": self.package_management,
            "build": self.build,
            "edition": self.edition,
            "fstab": [entry.to_dict() for entry in self.fstab],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OSInfo:
        fields = dict(data)
        fields["fstab"] = tuple(ResolvedFstabEntry.from_dict(e) for e in data.get("fstab", []))
        fields["notes"] = tuple(data.get("notes", []))
        return cls(**fields)
