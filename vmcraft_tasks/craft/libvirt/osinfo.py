"""libosinfo identity of an inspected guest: short id (virt-install's --os-variant) and URI.

Only releases osinfo-db is known to carry are mapped. A made-up URI would make
virt-manager and `virt-install --os-variant detect` believe in an OS that does not
exist, which is worse than no metadata, so anything unfamiliar maps to None.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"


class OsinfoId(NamedTuple):
    short_id: str  # debian12, rhel9.3, win2k19
    uri: str  # http://debian.org/debian/12


# Windows Server releases share NT 10.0 with the desktop ones; the build number is
# the exact discriminator (ProductName is localised on some installs and edited by
# some images). A year in ProductName is the fallback when the build is missing.
_WINDOWS_SERVER_BUILDS = {14393: "2k16", 17763: "2k19", 20348: "2k22"}
_WINDOWS_SERVER_YEARS = {
    "2012 r2": "2k12r2",
    "2016": "2k16",
    "2019": "2k19",
    "2022": "2k22",
}
_SERVER_YEAR = re.compile(r"server\s+(2012 r2|2016|2019|2022)\b", re.IGNORECASE)
# Windows 11 still reports "Windows 10 ..." as ProductName and 10.0 as its version;
# only the build (22000 and up) tells them apart.
_WIN11_FIRST_BUILD = 22000

_DEBIAN = range(9, 13)
_UBUNTU_LTS = {(18, 4), (20, 4), (22, 4), (24, 4)}
_RHEL_MINORS = {7: range(0, 10), 8: range(0, 11), 9: range(0, 7)}
# osinfo-db has only the major release for these rebuilds ("rocky9", "almalinux9").
_REBUILDS = {
    "rocky": ("rocky", "http://rockylinux.org/rocky/{major}", {8, 9}),
    "almalinux": ("almalinux", "http://almalinux.org/almalinux/{major}", {8, 9}),
}


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _windows(os_info: Mapping[str, Any]) -> OsinfoId | None:
    product = str(os_info.get("product_name") or "")
    edition = str(os_info.get("edition") or "")
    build = _int(os_info.get("build"))
    is_server = "server" in product.lower() or edition.lower().startswith("server")
    if is_server:
        version = _WINDOWS_SERVER_BUILDS.get(build) if build is not None else None
        if version is None and (match := _SERVER_YEAR.search(product)):
            version = _WINDOWS_SERVER_YEARS[match.group(1).lower()]
        if version is None:
            return None
        return OsinfoId(f"win{version}", f"http://microsoft.com/win/{version}")
    if os_info.get("major") == 10 and os_info.get("minor") in (0, None):
        desktop = "11" if build is not None and build >= _WIN11_FIRST_BUILD else "10"
        return OsinfoId(f"win{desktop}", f"http://microsoft.com/win/{desktop}")
    return None


def _linux(os_info: Mapping[str, Any]) -> OsinfoId | None:
    distro = os_info.get("distro")
    major = _int(os_info.get("major"))
    minor = _int(os_info.get("minor"))
    if major is None:
        return None
    if distro == "debian" and major in _DEBIAN:
        return OsinfoId(f"debian{major}", f"http://debian.org/debian/{major}")
    if distro == "ubuntu" and (major, minor) in _UBUNTU_LTS:
        version = f"{major}.{minor:02d}"
        return OsinfoId(f"ubuntu{version}", f"http://ubuntu.com/ubuntu/{version}")
    if distro == "rhel" and minor is not None and minor in _RHEL_MINORS.get(major, ()):
        # RHEL entries are per minor release; a bare "rhel9" does not exist.
        return OsinfoId(f"rhel{major}.{minor}", f"http://redhat.com/rhel/{major}.{minor}")
    if isinstance(distro, str) and distro in _REBUILDS:
        short, uri, majors = _REBUILDS[distro]
        if major in majors:
            return OsinfoId(f"{short}{major}", uri.format(major=major))
    return None


def osinfo_for(os_info: Mapping[str, Any] | None) -> OsinfoId | None:
    """The libosinfo id for an `OSInfo.to_dict()`, or None when it is not a mapped release."""
    if not os_info:
        return None
    if os_info.get("type") == "windows" or os_info.get("distro") == "windows":
        return _windows(os_info)
    if os_info.get("type") == "linux":
        return _linux(os_info)
    return None
