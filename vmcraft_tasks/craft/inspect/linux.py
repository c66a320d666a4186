"""Inspect a Linux root: distro, version, arch, hostname, packaging, fstab.

Pure helpers (hostname parsing, packaging defaults) come first; the functions that
read the guest take a GuestFS so every read stays inside the guest root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.arch import detect_linux_arch
from vmcraft_tasks.craft.inspect.fstab import (
    FstabEntry,
    ResolvedFstabEntry,
    parse_fstab,
    resolve_fstab,
)
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect.osrelease import (
    DistroInfo,
    distro_from_os_release,
    parse_debian_version,
    parse_lsb_release,
    parse_os_release,
    parse_redhat_release,
    parse_suse_release,
    refine_minor,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.redact import redact_line
from vmcraft_tasks.craft.volumes import VolumeTable

# Config files are small; a huge one is hostile or corrupt and not worth reading.
TEXT_FILE_CAP = 1024 * 1024
# A product name, distro id or hostname longer than this is not one: the facts are
# cut here, where they are read, so a guest cannot put a megabyte of os-release
# PRETTY_NAME into every report, job record and summary row. (The text itself is kept
# as the guest wrote it; whoever prints it escapes it, see craft/textsafe.py.)
MAX_FACT_CHARS = 256

RHEL_FAMILY = frozenset({"rhel", "centos", "rocky", "almalinux", "oraclelinux", "scientificlinux"})

# (format, marker paths): the package database each format keeps. dpkg comes first
# because Debian systems sometimes carry an rpm database for alien/rpm tooling.
PACKAGE_FORMATS = (
    ("deb", ("/var/lib/dpkg/status",)),
    ("rpm", ("/var/lib/rpm", "/usr/lib/sysimage/rpm")),
    ("pacman", ("/var/lib/pacman",)),
    ("apk", ("/lib/apk/db/installed",)),
)

# Front-ends per format, preferred first: on EL8+ yum is a symlink to dnf, so dnf
# must be tried before yum.
PACKAGE_MANAGERS = {
    "deb": (("apt", "apt-get"),),
    "rpm": (
        ("dnf", "dnf5"),
        ("dnf", "dnf"),
        ("yum", "yum"),
        ("zypper", "zypper"),
        ("urpmi", "urpmi"),
    ),
    "pacman": (("pacman", "pacman"),),
    "apk": (("apk", "apk"),),
}
_BIN_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


def bounded(value: str | None) -> str | None:
    """A guest-supplied fact cut to `MAX_FACT_CHARS` characters."""
    return value if value is None else value[:MAX_FACT_CHARS]


def parse_hostname_file(text: str) -> str | None:
    """Hostname from /etc/hostname or /etc/HOSTNAME: first non-comment word."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            return line.split()[0]
    return None


def parse_sysconfig_network(text: str) -> str | None:
    """HOSTNAME= from /etc/sysconfig/network (RHEL 6 and older)."""
    value = parse_os_release(text).get("HOSTNAME", "").strip()
    return value or None


def default_package_management(distro: str | None, major: int | None) -> str | None:
    """What the distro ships as its package front-end when no binary says otherwise."""
    if distro in ("fedora",):
        return "dnf"
    if distro in RHEL_FAMILY:
        return "dnf" if major is not None and major >= 8 else "yum"
    if distro in ("sles", "opensuse"):
        return "zypper"
    if distro in ("debian", "ubuntu", "linuxmint", "kalilinux"):
        return "apt"
    if distro == "archlinux":
        return "pacman"
    if distro == "alpinelinux":
        return "apk"
    return None


def _read_optional(fs: GuestFS, path: str, notes: list[str]) -> str | None:
    """Text of a guest file that may legitimately be absent (absent -> None).

    A file that is present but unreadable is recorded in `notes`, so an unknown
    result can always be explained.
    """
    if not fs.exists(path):
        return None
    try:
        return fs.cat(path, max_size=TEXT_FILE_CAP)
    except GuestPathError as exc:
        notes.append(f"cannot read {path}: {exc.reason}")
        return None


def detect_distro(fs: GuestFS, notes: list[str]) -> DistroInfo | None:
    """Distro identity: os-release first, then the older per-distro release files."""
    text = _read_optional(fs, "/etc/os-release", notes)
    if text is None:
        text = _read_optional(fs, "/usr/lib/os-release", notes)
    info = distro_from_os_release(parse_os_release(text)) if text else None
    if info is not None:
        if info.distro == "debian":
            detail = _read_optional(fs, "/etc/debian_version", notes)
            info = refine_minor(info, parse_debian_version(detail) if detail else None)
        elif info.distro in RHEL_FAMILY:
            detail = _read_optional(fs, "/etc/redhat-release", notes)
            info = refine_minor(info, parse_redhat_release(detail) if detail else None)
        return info
    fallbacks = (
        ("/etc/redhat-release", parse_redhat_release),
        ("/etc/SuSE-release", parse_suse_release),
        # lsb-release before debian_version: Ubuntu has both, and only lsb-release
        # says Ubuntu.
        ("/etc/lsb-release", parse_lsb_release),
        ("/etc/debian_version", parse_debian_version),
    )
    for path, parser in fallbacks:
        text = _read_optional(fs, path, notes)
        found = parser(text) if text else None
        if found is not None:
            return found
    return None


def detect_hostname(fs: GuestFS, notes: list[str]) -> str | None:
    for path in ("/etc/hostname", "/etc/HOSTNAME"):
        text = _read_optional(fs, path, notes)
        name = parse_hostname_file(text) if text else None
        if name:
            return name
    text = _read_optional(fs, "/etc/sysconfig/network", notes)
    return parse_sysconfig_network(text) if text else None


def detect_package_format(fs: GuestFS) -> str | None:
    for fmt, markers in PACKAGE_FORMATS:
        if any(fs.exists(marker) for marker in markers):
            return fmt
    return None


def detect_package_management(
    fs: GuestFS, package_format: str | None, distro: DistroInfo | None
) -> str | None:
    for name, binary in PACKAGE_MANAGERS.get(package_format or "", ()):
        if any(fs.is_file(f"{directory}/{binary}") for directory in _BIN_DIRS):
            return name
    if distro is None:
        return None
    return default_package_management(distro.distro, distro.major)


def read_fstab(
    fs: GuestFS,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    notes: list[str],
    volumes: VolumeTable | None = None,
) -> tuple[ResolvedFstabEntry, ...]:
    """The guest's fstab, each entry resolved to a partition of this disk, or, given the
    VM's `volumes`, to a volume of any of its disks or LVs."""
    text = _read_optional(fs, "/etc/fstab", notes)
    if text is None:
        notes.append("no /etc/fstab")
        return ()
    # The inspection report travels into JSON files and Redis: a cifs or davfs entry's
    # password=... option (or URL password) must not go with it. Resolution uses the
    # spec, mountpoint and option names, which redaction keeps.
    entries = [_without_secrets(entry) for entry in parse_fstab(text)]
    return tuple(resolve_fstab(entries, filesystems, partitions, volumes))


def _without_secrets(entry: FstabEntry) -> FstabEntry:
    options = tuple(redact_line(option) for option in entry.options)
    spec = redact_line(entry.spec)
    if options == entry.options and spec == entry.spec:
        return entry
    return replace(entry, spec=spec, options=options)


def inspect_linux(
    fs: GuestFS,
    *,
    root_partition: int,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    volumes: VolumeTable | None = None,
) -> OSInfo:
    """Inspect the Linux root mounted at `fs.root` (`volumes`: see `read_fstab`)."""
    notes: list[str] = []
    distro = detect_distro(fs, notes)
    if distro is None:
        notes.append("no os-release or distribution release file found")
    arch = detect_linux_arch(fs)
    if arch is None:
        notes.append("no readable ELF binary to tell the architecture")
    package_format = detect_package_format(fs)
    return OSInfo(
        root_partition=root_partition,
        type="linux",
        distro=bounded(distro.distro) if distro else None,
        product_name=bounded(distro.product_name) if distro else None,
        major=distro.major if distro else None,
        minor=distro.minor if distro else None,
        arch=arch,
        hostname=bounded(detect_hostname(fs, notes)),
        package_format=package_format,
        package_management=detect_package_management(fs, package_format, distro),
        fstab=read_fstab(fs, filesystems, partitions, notes, volumes),
        notes=tuple(notes),
    )
