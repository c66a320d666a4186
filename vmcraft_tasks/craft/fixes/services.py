"""Which guest symlinks enable the VMware tools services (pure name tests).

The tools talk to a VMware host that is no longer there; on KVM they fail at boot
or spin. Disabling means removing the enablement symlinks, exactly what
`systemctl disable` / `update-rc.d remove` would do; the packages stay installed.
"""

from __future__ import annotations

import re

# vgauthd.service is the RHEL spelling of vgauth.service.
VMWARE_UNITS = frozenset(
    {
        "vmtoolsd.service",
        "vmware-tools.service",
        "open-vm-tools.service",
        "vgauth.service",
        "vgauthd.service",
    }
)
# Enablement lives in <unit>.wants/ (WantedBy=) and <unit>.requires/ (RequiredBy=).
_ENABLEMENT_DIR = re.compile(r"^.+\.(?:wants|requires)$")
# Start links only: the K links stop a service and are harmless.
_SYSV_START_LINK = re.compile(r"^S\d\dvmware-tools$")


def is_enablement_dir(name: str) -> bool:
    """True for a systemd `*.wants` / `*.requires` directory name."""
    return _ENABLEMENT_DIR.match(name) is not None


def is_vmware_unit_link(name: str) -> bool:
    """True for an entry of a `.wants`/`.requires` directory that enables VMware tools."""
    return name in VMWARE_UNITS


def is_vmware_sysv_link(name: str) -> bool:
    """True for an /etc/rc?.d start link of the old VMware tools init script."""
    return _SYSV_START_LINK.match(name) is not None
