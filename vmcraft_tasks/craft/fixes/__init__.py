"""Offline fixes applied to a converted guest's mounted root so it boots on KVM.

Pure rewriters (fstab, network, initramfs, services) take and return text; the
per-distro fixers in `distros` do the guest I/O through GuestFS. `lvmboot` checks the
LVM names on the guest's kernel command lines against the VM's LVs.
"""

from __future__ import annotations

from vmcraft_tasks.craft.fixes.distros import Fixer, apply_fixes, fixer_for, no_fixer_reason
from vmcraft_tasks.craft.fixes.model import Change, FixRecord, FixReport, FixSkip, RewriteError

__all__ = [
    "Change",
    "FixRecord",
    "FixReport",
    "FixSkip",
    "Fixer",
    "RewriteError",
    "apply_fixes",
    "fixer_for",
    "no_fixer_reason",
]
