"""Variants of the bootable samples made at use time, and the domains they boot with.

- `without_serial_console(source, copy)`: a qcow2 copy of a bootable Debian sample with
  every serial console setting removed (kernel command lines, GRUB's serial terminal,
  serial getty links), as most VMware guests are: a boot check must boot its kernel
  directly to see its console.
- `sata_domain(name, disks, os_info, uefi=)`: the domain XML the project's libvirt
  writer renders for a guest of unknown capabilities (SATA, no NIC), as the guest ran
  on VMware.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.guestcaps import CAPS_UNKNOWN
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.libvirt import DiskSpec, DomainSpec, defaults_from_guest, render_domain
from vmcraft_tasks.craft.vmcraft import VMCraft

CONVERT_TIMEOUT_S = 900.0
_CONSOLE_ARG = (r"[ \t]*console=ttyS[^\s\"']*", "")


def _strip(fs: GuestFS, path: str, patterns: Sequence[tuple[str, str]]) -> None:
    text = fs.cat(path)
    for pattern, replacement in patterns:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    fs.write_file(path, text.encode())


def without_serial_console(source: str, copy: str) -> None:
    """Write `copy` (qcow2): `source` with no serial console configured anywhere."""
    commands.run(["qemu-img", "convert", "-O", "qcow2", source, copy], timeout=CONVERT_TIMEOUT_S)
    with VMCraft(copy, readonly=False) as g:
        (root,) = g.inspect_os()
        boot = next(r.resolved_partition for r in root.fstab if r.entry.mountpoint == "/boot")
        if boot is None:
            raise ValueError(f"{source}: no /boot in its fstab")
        root_fs, boot_fs = g.guest(root), g.guest(boot)
        _strip(
            boot_fs,
            "/grub/grub.cfg",
            [
                _CONSOLE_ARG,
                (r"^serial .*\n", ""),
                (r"^(terminal_\w+) console serial$", r"\1 console"),
            ],
        )
        _strip(
            root_fs,
            "/etc/default/grub",
            [_CONSOLE_ARG, (r"^GRUB_SERIAL_COMMAND=.*\n", ""), (r"^GRUB_TERMINAL=.*\n", "")],
        )
        for wants in ("getty.target.wants", "multi-user.target.wants"):
            directory = f"/etc/systemd/system/{wants}"
            if root_fs.is_dir(directory):
                for name in root_fs.ls(directory):
                    if name.startswith("serial-getty@"):
                        root_fs.remove(f"{directory}/{name}")
        if "ttyS" in boot_fs.cat("/grub/grub.cfg") or "ttyS" in root_fs.cat("/etc/default/grub"):
            raise ValueError(f"{copy}: a serial console setting survived")


def sata_domain(
    name: str, disks: int, os_info: dict[str, Any] | None = None, *, uefi: bool = False
) -> str:
    """A domain of `disks` SATA disks and no NIC (the boot check takes the disk paths
    from its caller; the ones here are placeholders)."""
    info = os_info or OSInfo(root_partition=0, type="linux", distro="debian", major=12).to_dict()
    letters = "abcdefghijklmnopqrstuvwxyz"
    spec = DomainSpec(
        name=name,
        memory_mib=1024,
        vcpus=1,
        disks=[
            DiskSpec(f"/var/lib/libvirt/images/{name}-{n}.qcow2", "qcow2", f"vd{letters[n]}")
            for n in range(disks)
        ],
        networks=[],
        os_info=info,
    )
    return render_domain(defaults_from_guest(info, uefi, CAPS_UNKNOWN).apply(spec))
