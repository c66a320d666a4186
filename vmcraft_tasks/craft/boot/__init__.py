"""Headless boot checks: boot a disk under qemu and judge its serial console.

`qemu.py` builds the command line and `console.py` decides from console text (both
pure); `run.py` is the edge that starts qemu, watches it and always kills it.
`domain.py` turns domain XML into a boot spec (pure), `accel.py` tests whether KVM
really runs a guest, `guest.py` decides what to boot for a Linux guest, and
`check.py`'s `check_guest` puts it all together for the fleet and the CLI.
"""

from vmcraft_tasks.craft.boot.accel import AccelProbe, choose_accel, kvm_verdict, probe_kvm
from vmcraft_tasks.craft.boot.check import BootCheckResult, check_guest
from vmcraft_tasks.craft.boot.console import ConsoleWatcher, Reason, Until, Verdict, judge
from vmcraft_tasks.craft.boot.domain import spec_from_domain
from vmcraft_tasks.craft.boot.guest import (
    BootPlanError,
    GuestBoot,
    boot_plan,
    extract_kernel,
    serial_console_configured,
)
from vmcraft_tasks.craft.boot.qemu import BootDisk, BootSpec, DirectKernel, QemuSpecError, qemu_argv
from vmcraft_tasks.craft.boot.run import BootLimits, BootStopped, boot_check

__all__ = [
    "AccelProbe",
    "BootCheckResult",
    "BootDisk",
    "BootLimits",
    "BootPlanError",
    "BootSpec",
    "BootStopped",
    "ConsoleWatcher",
    "DirectKernel",
    "GuestBoot",
    "QemuSpecError",
    "Reason",
    "Until",
    "Verdict",
    "boot_check",
    "boot_plan",
    "check_guest",
    "choose_accel",
    "extract_kernel",
    "judge",
    "kvm_verdict",
    "probe_kvm",
    "qemu_argv",
    "serial_console_configured",
    "spec_from_domain",
]
