"""A VM's attach as the host keeps it between steps, and its release from any piece.

A fleet VM's steps run in different worker processes of one host: each resumes the
VM from its boot disk's attach state directory. That directory holds `vm.json`, the
record of the VM's other disks (their own attach state directories, in the VM's disk
order) and, once scanned, what the scan found; each further disk's directory points
back to it (`vm-member.json`). Exposed LVs live under the boot disk's directory
(`craft.lvm.expose`). The record is written by this host, never taken from a message.

Release order follows what holds what: mounts first (every private mount is under
the boot disk's directory), then the LVs (their helpers read the disks), then the
further disks, the boot disk last. `release_vm` does that from the directories alone,
so a restarted worker's reaper can call it on whichever disk of the VM it meets first.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from vmcraft_tasks.craft import atomicfile, mountinfo
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.lvm import expose
from vmcraft_tasks.craft.nbd.reap import release_state_dir

log = logging.getLogger(__name__)

VM_FILE = "vm.json"
MEMBER_FILE = "vm-member.json"
ATTACH_PREFIX = "attach-"
PRIVATE_MOUNTS = "mnt"  # VMCraft's private mountpoints, under an attach state dir


@dataclass
class VMRecord:
    disks: list[str]  # attach state directories, the boot disk's first
    readonly: bool
    scan: dict[str, Any] | None = None
    formats: list[str | None] = field(default_factory=list)

    def save(self, boot_dir: str) -> None:
        data = {
            "disks": self.disks,
            "readonly": self.readonly,
            "scan": self.scan,
            "formats": self.formats,
        }
        atomicfile.atomic_write(os.path.join(boot_dir, VM_FILE), json.dumps(data))

    @classmethod
    def load(cls, boot_dir: str) -> VMRecord | None:
        """The record of the VM whose boot disk this is; None for a lone disk."""
        try:
            with open(os.path.join(boot_dir, VM_FILE)) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise VMCraftError(f"{boot_dir}: unreadable VM record: {exc}") from exc
        disks = [str(d) for d in data.get("disks") or []]
        if not disks or os.path.realpath(disks[0]) != os.path.realpath(boot_dir):
            raise VMCraftError(f"{boot_dir}: the VM record does not start with its boot disk")
        return cls(
            disks=disks,
            readonly=bool(data.get("readonly", True)),
            scan=data.get("scan"),
            formats=list(data.get("formats") or []),
        )


def is_sibling_attach(state_dir: str, boot_dir: str) -> bool:
    """True for an attach state directory next to the boot disk's (same host work dir)."""
    real = os.path.realpath(state_dir)
    return os.path.dirname(real) == os.path.dirname(
        os.path.realpath(boot_dir)
    ) and os.path.basename(real).startswith(ATTACH_PREFIX)


def mark_member(state_dir: str, boot_dir: str) -> None:
    atomicfile.atomic_write(os.path.join(state_dir, MEMBER_FILE), json.dumps({"boot": boot_dir}))


def boot_of(state_dir: str) -> str:
    """The boot disk's attach state directory of the VM `state_dir` belongs to (itself
    for a boot disk or a lone disk)."""
    try:
        with open(os.path.join(state_dir, MEMBER_FILE)) as fh:
            boot = str(json.load(fh).get("boot") or "")
    except (OSError, ValueError):
        return state_dir
    return boot if boot and is_sibling_attach(boot, state_dir) else state_dir


def release_vm(state_dir: str) -> None:
    """Unmount, release the LVs, detach every disk of the VM `state_dir` belongs to, and
    remove their directories; idempotent. Every piece is tried; the first error is
    raised at the end."""
    boot = boot_of(state_dir)
    record = VMRecord.load(boot) if os.path.isdir(boot) else None
    members = [] if record is None else [d for d in record.disks[1:] if is_sibling_attach(d, boot)]
    errors: list[str] = []
    if os.path.isdir(boot):
        # Only the private mounts (under mnt/, deepest first). The disks' and LVs' FUSE
        # files are their backends' to unmount, after the loop devices on them: a FUSE
        # file unmounted under a loop device leaves that loop attached to a detached
        # mount, with no backing file left to verify it by.
        for mountpoint in mountinfo.mounts_under(os.path.join(boot, PRIVATE_MOUNTS)):
            try:
                mountinfo.unmount(mountpoint)
            except VMCraftError as exc:
                errors.append(str(exc))
        try:
            expose.release_all(boot)
        except (VMCraftError, OSError) as exc:
            errors.append(f"releasing LVs: {exc}")
    for disk_dir in [*reversed(members), boot]:
        try:
            release_state_dir(disk_dir)
        except (VMCraftError, OSError) as exc:
            errors.append(f"{disk_dir}: {exc}")
    if os.path.realpath(state_dir) != os.path.realpath(boot) and os.path.isdir(state_dir):
        # A further disk whose boot disk had forgotten it (or was gone already).
        try:
            release_state_dir(state_dir)
        except (VMCraftError, OSError) as exc:
            errors.append(f"{state_dir}: {exc}")
    if errors:
        raise VMCraftError("; ".join(errors))
    log.debug("released the VM attached at %s", boot)
