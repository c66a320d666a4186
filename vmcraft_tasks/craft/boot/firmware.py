"""Where this host keeps the UEFI firmware for a test boot (pure apart from os.path.exists).

Debian's `ovmf` package ships each OVMF build as a pair: the read-only CODE image and
an empty VARS template of the same size (qemu attaches the template with snapshot=on,
see qemu.py, so a boot never changes it). Only the plain builds are candidates:
`.secboot` CODE refuses to run without SMM and `.ms`/`.snakeoil` VARS enroll keys
that turn Secure Boot on, and a test guest boots with Secure Boot off (no shim).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vmcraft_tasks.craft.errors import VMCraftError

OVMF_PACKAGE = "ovmf"
OVMF_DIRS = ("/usr/share/OVMF",)
# (code, vars) in order of preference: the 4 MiB builds Debian's own firmware
# descriptors rank first, then the older 2 MiB layout. A pair is never mixed:
# qemu rejects VARS of another build's size.
OVMF_PAIRS = (
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),
)


class FirmwareNotFoundError(VMCraftError):
    """No usable UEFI firmware on this host; `package` is what provides it."""

    def __init__(self, package: str, dirs: Sequence[str], searched: Sequence[str]) -> None:
        self.package = package
        self.dirs = tuple(dirs)
        self.searched = tuple(searched)  # every file looked for
        super().__init__(
            f"no OVMF firmware (a CODE and VARS pair) in {', '.join(self.dirs)}: "
            f"install the {package} package (apt-get install {package})"
        )


def find_ovmf(dirs: Sequence[str] = OVMF_DIRS) -> tuple[str, str]:
    """(code, vars template) of the first complete OVMF pair, without Secure Boot.

    Raises FirmwareNotFoundError naming the package when no directory holds a pair.
    """
    searched = []
    for directory in dirs:
        for code_name, vars_name in OVMF_PAIRS:
            code = os.path.join(directory, code_name)
            variables = os.path.join(directory, vars_name)
            searched += [code, variables]
            if os.path.exists(code) and os.path.exists(variables):
                return code, variables
    raise FirmwareNotFoundError(OVMF_PACKAGE, dirs, searched)
