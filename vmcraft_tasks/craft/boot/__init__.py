"""Headless boot checks: boot a disk under qemu and judge its serial console.

`qemu.py` builds the command line and `console.py` decides from console text (both
pure); `run.py` is the edge that starts qemu, watches it and always kills it.
"""

from vmcraft_tasks.craft.boot.console import ConsoleWatcher, Reason, Until, Verdict, judge
from vmcraft_tasks.craft.boot.qemu import BootDisk, BootSpec, DirectKernel, QemuSpecError, qemu_argv
from vmcraft_tasks.craft.boot.run import BootLimits, boot_check

__all__ = [
    "BootDisk",
    "BootLimits",
    "BootSpec",
    "ConsoleWatcher",
    "DirectKernel",
    "QemuSpecError",
    "Reason",
    "Until",
    "Verdict",
    "boot_check",
    "judge",
    "qemu_argv",
]
