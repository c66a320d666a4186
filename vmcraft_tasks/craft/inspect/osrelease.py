"""Distribution identity from os-release and the older release files (pure parsers).

Reading the files is linux.py's job; everything here takes text and returns values,
so every format quirk can be unit-tested without a guest tree.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

# os-release IDs mapped to the distro names libguestfs reports, so callers written
# against virt-inspector output (virt-v2v style decision tables) keep working.
# IDs not listed are passed through lowercased rather than collapsed to "unknown":
# an unfamiliar but honest ID is more useful to a report than a placeholder.
_DISTRO_IDS = {
    "almalinux": "almalinux",
    "alpine": "alpinelinux",
    "altlinux": "altlinux",
    "arch": "archlinux",
    "centos": "centos",
    "circle": "circle",
    "coreos": "coreos",
    "debian": "debian",
    "fedora": "fedora",
    "frugalware": "frugalware",
    "gentoo": "gentoo",
    "kali": "kalilinux",
    "kylin": "kylin",
    "linuxmint": "linuxmint",
    "mageia": "mageia",
    "neokylin": "neokylin",
    "ol": "oraclelinux",
    "opensuse": "opensuse",
    "opensuse-leap": "opensuse",
    "opensuse-tumbleweed": "opensuse",
    "pardus": "pardus",
    "pld": "pldlinux",
    "rhel": "rhel",
    "rocky": "rocky",
    "scientific": "scientificlinux",
    "sled": "sles",
    "sles": "sles",
    "sles_sap": "sles",
    "ubuntu": "ubuntu",
    "void": "voidlinux",
}

# Matched against the START of /etc/redhat-release: a derivative's line may mention
# another vendor further on, and that must not decide the distro.
_REDHAT_PREFIXES = (
    ("red hat enterprise linux", "rhel"),
    ("centos", "centos"),
    ("rocky linux", "rocky"),
    ("almalinux", "almalinux"),
    ("fedora", "fedora"),
    ("oracle linux", "oraclelinux"),
    ("scientific linux", "scientificlinux"),
    ("mageia", "mageia"),
)

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DQ_ESCAPE = re.compile(r"\\([\\$\"`])")
_ESCAPE = re.compile(r"\\(.)")
_VERSION = re.compile(r"^\s*(\d+)(?:\.(\d+))?")
_RELEASE_VERSION = re.compile(r"\brelease\s+(\d+)(?:\.(\d+))?", re.IGNORECASE)
_SUSE_FIELD = re.compile(r"^\s*(VERSION|PATCHLEVEL)\s*=\s*(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class DistroInfo:
    distro: str
    product_name: str | None
    major: int | None
    minor: int | None
    source: str  # which file said so: "os-release", "redhat-release", ...
    version: str | None = None  # the raw version text, to tell "12" from "12.0"

    @property
    def has_minor(self) -> bool:
        match = _VERSION.match(self.version) if self.version else None
        return match is not None and match.group(2) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unquote(value: str) -> str:
    # os-release uses shell-like quoting, but only \\ \" \$ and \` are escapes inside
    # double quotes (shlex would keep the backslash of \$).
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        return inner if value[0] == "'" else _DQ_ESCAPE.sub(r"\1", inner)
    if value[:1] in ("'", '"'):
        return value.strip("\"'")  # unbalanced quote: keep the text, drop the quotes
    return _ESCAPE.sub(r"\1", value)


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release (or lsb-release) KEY=value text into a dict."""
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            continue
        fields[key] = _unquote(value.strip())
    return fields


def normalise_distro_id(distro_id: str) -> str:
    """The libguestfs distro name for an os-release ID."""
    key = distro_id.strip().lower()
    return _DISTRO_IDS.get(key, key)


def parse_version(version: str | None) -> tuple[int | None, int | None]:
    """Major and minor of a version string: "12" -> (12, 0), "22.04" -> (22, 4).

    No leading number (e.g. "rolling") gives (None, None).
    """
    if not version:
        return None, None
    match = _VERSION.match(version)
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2) or 0)


def distro_from_os_release(fields: dict[str, str]) -> DistroInfo | None:
    """Distro identity from parsed os-release fields; None when there is no ID."""
    distro_id = fields.get("ID")
    if not distro_id:
        return None
    version = fields.get("VERSION_ID")
    major, minor = parse_version(version)
    return DistroInfo(
        distro=normalise_distro_id(distro_id),
        product_name=fields.get("PRETTY_NAME") or fields.get("NAME"),
        major=major,
        minor=minor,
        source="os-release",
        version=version,
    )


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_redhat_release(text: str) -> DistroInfo | None:
    """Parse /etc/redhat-release, e.g. "Rocky Linux release 9.3 (Blue Onyx)"."""
    line = _first_line(text)
    if not line:
        return None
    lowered = line.lower()
    # libguestfs's name for a Red Hat derivative it does not recognise.
    distro = "redhat-based"
    for prefix, name in _REDHAT_PREFIXES:
        if lowered.startswith(prefix):
            distro = name
            break
    match = _RELEASE_VERSION.search(line)
    major = int(match.group(1)) if match else None
    minor = int(match.group(2) or 0) if match else None
    version = None
    if match:
        version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    return DistroInfo(distro, line, major, minor, "redhat-release", version)


def parse_debian_version(text: str) -> DistroInfo | None:
    """Parse /etc/debian_version: "12.5" -> 12, 5; "trixie/sid" -> no version."""
    line = _first_line(text)
    if not line:
        return None
    major, minor = parse_version(line)
    return DistroInfo("debian", line, major, minor, "debian_version", line if major else None)


def parse_suse_release(text: str) -> DistroInfo | None:
    """Parse the old /etc/SuSE-release (first line product, then VERSION/PATCHLEVEL)."""
    line = _first_line(text)
    if not line:
        return None
    lowered = line.lower()
    if "opensuse" in lowered:
        distro = "opensuse"
    elif "suse linux enterprise" in lowered or lowered.startswith("suse linux"):
        distro = "sles"
    else:
        distro = "suse-based"
    fields = {key: value for key, value in _SUSE_FIELD.findall(text)}
    major, minor = parse_version(fields.get("VERSION"))
    patchlevel = fields.get("PATCHLEVEL")
    if major is not None and patchlevel and patchlevel.isdigit():
        # SLES 11 SP4 writes VERSION = 11 and PATCHLEVEL = 4.
        minor = int(patchlevel)
    # The product line often ends with the arch in brackets; it is not part of the name.
    product = re.sub(r"\s*\([^)]*\)\s*$", "", line)
    version = None if major is None else f"{major}.{minor}"
    return DistroInfo(distro, product, major, minor, "SuSE-release", version)


def parse_lsb_release(text: str) -> DistroInfo | None:
    """Parse /etc/lsb-release (DISTRIB_ID, DISTRIB_RELEASE, DISTRIB_DESCRIPTION)."""
    fields = parse_os_release(text)
    distro_id = fields.get("DISTRIB_ID")
    if not distro_id:
        return None
    version = fields.get("DISTRIB_RELEASE")
    major, minor = parse_version(version)
    return DistroInfo(
        distro=normalise_distro_id(distro_id),
        product_name=fields.get("DISTRIB_DESCRIPTION"),
        major=major,
        minor=minor,
        source="lsb-release",
        version=version,
    )


def refine_minor(info: DistroInfo, detail: DistroInfo | None) -> DistroInfo:
    """Take the minor version from a more detailed file when os-release gave only a major.

    Debian's os-release says VERSION_ID="12" while /etc/debian_version says "12.5";
    CentOS 7 says "7" while /etc/redhat-release says "7.9.2009". The detail is used
    only when it agrees on the major version, so a stale file cannot contradict.
    """
    if detail is None or info.has_minor or not detail.has_minor:
        return info
    if info.major is None or detail.major != info.major:
        return info
    return replace(info, minor=detail.minor)
