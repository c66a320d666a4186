"""Which hypervisor-bound device names a guest still uses where booting depends on them.

After the fixes (or without them) a guest may still name `/dev/sda2` in fstab, on
its kernel command line or in crypttab. Such a name exists on KVM only when the
disk sits on an sd* bus (SATA/SCSI); `/dev/hdX`, `/dev/xvdX`, NVMe and by-id/by-path
names exist on no bus the converted guest gets. The guest capabilities and the
verdict on a VM are decided from this list, so the reading is kept apart (pure
parsers over text, one small reader). Given the VM's volumes, a name of a disk the VM
does not have (/dev/sdc1 on a VM of two disks) exists on no bus at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.fixes.distros import Fixer
from vmcraft_tasks.craft.fixes.fstab import guest_disk_index, is_hardware_name
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.fstab import KIND_DEVICE, classify_entry, parse_fstab
from vmcraft_tasks.craft.inspect.linux import TEXT_FILE_CAP
from vmcraft_tasks.craft.volumes import VolumeTable

# Options that keep a missing device from stopping the boot.
_OPTIONAL = frozenset({"nofail", "noauto"})
_SD_NAME = re.compile(r"^/dev/sd[a-z]+\d*$")
_KERNEL_DEVICE_ARG = re.compile(r"""(?<![^\s"'])(?:root|resume)=(/dev/[^\s"'\\;$]+)""")
_GRUB_KERNEL_LINE = re.compile(r"^\s*(?:linux|linux16|linuxefi|kernel)\s")
_BLS_OPTIONS_LINE = re.compile(r"^\s*options\s")
_DEFAULT_GRUB_LINE = re.compile(r"^\s*GRUB_CMDLINE_LINUX(?:_DEFAULT)?=")
_GRUBENV_LINE = re.compile(r"^kernelopts=")
_ANY_LINE = re.compile(r"")
MAX_BLS_ENTRIES = 256


@dataclass(frozen=True)
class DeviceNameUse:
    """One place where the guest depends on a hypervisor-bound device name."""

    name: str  # /dev/sda2
    path: str  # the guest file: /etc/fstab, /boot/grub/grub.cfg, ...
    what: str  # "fstab /boot", "kernel root=", "crypttab cryptdata"
    missing_disk: str | None = None  # the name is of a disk the VM does not have: why

    @property
    def sd_bus_keeps_it(self) -> bool:
        """True when a SATA/SCSI disk on KVM still has this name (/dev/sdXN)."""
        return self.missing_disk is None and _SD_NAME.match(self.name) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"{self.path}: {self.what} names {self.name}"
        return text if self.missing_disk is None else f"{text} ({self.missing_disk})"


def in_fstab(text: str, path: str = "/etc/fstab") -> list[DeviceNameUse]:
    """Entries that must mount at boot and name a hardware-bound device (pure)."""
    found = []
    for entry in parse_fstab(text):
        if classify_entry(entry) != KIND_DEVICE or not is_hardware_name(entry.spec):
            continue
        if _OPTIONAL & set(entry.options):
            continue
        where = "swap" if entry.fstype == "swap" else entry.mountpoint
        found.append(DeviceNameUse(entry.spec, path, f"fstab {where}"))
    return found


def in_kernel_args(text: str, path: str, line_pattern: re.Pattern[str]) -> list[DeviceNameUse]:
    """root=/resume= arguments on the kernel lines of a bootloader file (pure)."""
    found = []
    for line in text.splitlines():
        if not line_pattern.match(line):
            continue
        for match in _KERNEL_DEVICE_ARG.finditer(line):
            name = match.group(1)
            if is_hardware_name(name):
                arg = match.group(0).split("=", 1)[0]
                found.append(DeviceNameUse(name, path, f"kernel {arg}="))
    return _unique(found)


def in_crypttab(text: str, path: str = "/etc/crypttab") -> list[DeviceNameUse]:
    found = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or not is_hardware_name(fields[1]):
            continue
        options = set(fields[3].split(",")) if len(fields) > 3 else set()
        if _OPTIONAL & options:
            continue
        found.append(DeviceNameUse(fields[1], path, f"crypttab {fields[0]}"))
    return found


def _unique(uses: Iterable[DeviceNameUse]) -> list[DeviceNameUse]:
    return list(dict.fromkeys(uses))


def _read(fs: GuestFS, path: str) -> str | None:
    try:
        if not fs.is_file(path):
            return None
        return fs.read_file(path, max_size=TEXT_FILE_CAP).decode("utf-8", errors="replace")
    except GuestPathError:
        return None


def _kernel_arg_files(fs: GuestFS) -> list[tuple[str, re.Pattern[str]]]:
    """The files the kernel command-line fix edits (same paths), with their arg lines."""
    files = [(path, _GRUB_KERNEL_LINE) for path in Fixer.grub_cfg_paths]
    files.append((Fixer.default_grub_path, _DEFAULT_GRUB_LINE))
    for directory in Fixer.bls_entries_dirs:
        if fs.is_dir(directory):
            entries = sorted(e for e in fs.ls(directory) if e.endswith(".conf"))
            files += [(f"{directory}/{e}", _BLS_OPTIONS_LINE) for e in entries[:MAX_BLS_ENTRIES]]
    files.append((Fixer.grubenv_path, _GRUBENV_LINE))
    files.append((Fixer.kernel_cmdline_path, _ANY_LINE))
    return files


def on_missing_disks(uses: Iterable[DeviceNameUse], volumes: VolumeTable) -> list[DeviceNameUse]:
    """`uses`, those naming a disk the VM does not have marked so (pure)."""
    disks = volumes.disks()
    marked = []
    for use in uses:
        index = guest_disk_index(use.name)
        if index is not None and index >= disks:
            why = f"the VM has {disks} disk{'' if disks == 1 else 's'}, not {index + 1}"
            marked.append(replace(use, missing_disk=why))
        else:
            marked.append(use)
    return marked


def device_name_uses(fs: GuestFS, volumes: VolumeTable | None = None) -> list[DeviceNameUse]:
    """Every boot-relevant use of a hypervisor-bound device name in the guest tree `fs`.

    With the VM's `volumes`, names of disks the VM does not have are marked (no bus
    provides them, SATA included)."""
    found: list[DeviceNameUse] = []
    if (text := _read(fs, Fixer.fstab_path)) is not None:
        found += in_fstab(text, Fixer.fstab_path)
    if (text := _read(fs, Fixer.crypttab_path)) is not None:
        found += in_crypttab(text, Fixer.crypttab_path)
    for path, lines in _kernel_arg_files(fs):
        if (text := _read(fs, path)) is not None:
            found += in_kernel_args(text, path, lines)
    found = _unique(found)
    return found if volumes is None else on_missing_disks(found, volumes)
