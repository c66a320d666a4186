"""Inspect a Windows root: version and product from the SOFTWARE hive, hostname from SYSTEM.

Registry hives are read with `hivexget` (libhivex) through the one command runner.
Anything that stops us reading them (tool missing, not a hive, key absent) leaves
the fact unknown with a note saying why: a half-readable guest still gets a report.

Paths are looked up ignoring case, as libguestfs does: NTFS through FUSE keeps the
on-disk case, but guests vary (System32 vs system32, WINNT vs Windows).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError, GuestPathError, InspectError
from vmcraft_tasks.craft.guestcaps import WINDOWS_VIRTIO_SERVICES, WindowsDriver, WindowsDrivers
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.arch import HEADER_BYTES, parse_pe_arch
from vmcraft_tasks.craft.inspect.model import OSInfo

# NT 4 / 2000 installed into WINNT; everything later into Windows.
SYSTEMROOT_CANDIDATES = ("/Windows", "/WINNT")
HIVEXGET_TIMEOUT_S = 30.0
CURRENT_VERSION_KEY = r"Microsoft\Windows NT\CurrentVersion"
COMPUTER_NAME_KEY = r"Control\ComputerName\ComputerName"

RegistryValue = str | int

# One value in hivexget's regedit-style listing of a key. Strings may hold escaped
# quotes and even newlines, so this is matched over the whole text, not per line.
_ENTRY = re.compile(
    r"""
    \s*(?:"(?P<name>(?:[^"\\]|\\.)*)"|(?P<default>@))=
    (?:
        "(?P<sz>(?:[^"\\]|\\.)*)"
      | str\(\d+\):"(?P<str>(?:[^"\\]|\\.)*)"
      | dword:(?P<dword>[0-9a-fA-F]{8})
      | hex(?:\([0-9a-fA-F]+\))?:[0-9a-fA-F,\s\\]*
    )[ \t]*(?:\r?\n|\Z)
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


@dataclass(frozen=True)
class WindowsVersion:
    product_name: str | None
    major: int | None
    minor: int | None
    build: str | None
    edition: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unescape(text: str) -> str:
    return _ESCAPE.sub(r"\1", text)


def parse_hivexget_key(text: str) -> dict[str, RegistryValue]:
    """Values of one key from `hivexget HIVE KEY` output.

    Strings (REG_SZ, REG_EXPAND_SZ, ...) become str and DWORDs int; binary values
    are skipped because nothing here needs them. Names are case-folded, as the
    registry compares them case-insensitively.
    """
    values: dict[str, RegistryValue] = {}
    pos = 0
    while text[pos:].strip():
        match = _ENTRY.match(text, pos)
        if match is None:
            raise InspectError(f"unparseable hivexget output near {text[pos : pos + 40]!r}")
        pos = match.end()
        name = "@" if match.group("default") else _unescape(match.group("name"))
        if match.group("dword") is not None:
            values[name.casefold()] = int(match.group("dword"), 16)
        elif match.group("sz") is not None:
            values[name.casefold()] = _unescape(match.group("sz"))
        elif match.group("str") is not None:
            values[name.casefold()] = _unescape(match.group("str"))
    return values


def _text(values: dict[str, RegistryValue], name: str) -> str | None:
    value = values.get(name.casefold())
    if value is None:
        return None
    return str(value).strip() or None


def _number(values: dict[str, RegistryValue], name: str) -> int | None:
    value = values.get(name.casefold())
    return value if isinstance(value, int) else None


def windows_version_from_values(values: dict[str, RegistryValue]) -> WindowsVersion:
    """Version facts from the values of Microsoft\\Windows NT\\CurrentVersion.

    Windows 10 and later freeze CurrentVersion at "6.3" for old installers and keep
    the truth in CurrentMajorVersionNumber/CurrentMinorVersionNumber, so those win.
    """
    major = _number(values, "CurrentMajorVersionNumber")
    minor = _number(values, "CurrentMinorVersionNumber")
    if major is None:
        current = _text(values, "CurrentVersion") or ""
        match = re.match(r"^(\d+)(?:\.(\d+))?", current)
        if match:
            major, minor = int(match.group(1)), int(match.group(2) or 0)
    elif minor is None:
        minor = 0
    return WindowsVersion(
        product_name=_text(values, "ProductName"),
        major=major,
        minor=minor,
        build=_text(values, "CurrentBuildNumber"),
        edition=_text(values, "EditionID"),
    )


def _case_insensitive(fs: GuestFS) -> GuestFS:
    return fs if fs.case_insensitive else GuestFS(fs.root, case_insensitive=True)


def find_systemroot(fs: GuestFS) -> str | None:
    """Guest path of the Windows directory (as cased on disk), or None if not Windows."""
    fs = _case_insensitive(fs)
    for candidate in SYSTEMROOT_CANDIDATES:
        if fs.is_file(f"{candidate}/System32/cmd.exe"):
            return fs.realpath(candidate)
    return None


def is_windows_root(fs: GuestFS) -> bool:
    return find_systemroot(fs) is not None


def _failure(hive: str, key: str, exc: CommandError | InspectError) -> str:
    """A one-line explanation of why a hive key could not be read."""
    if isinstance(exc, InspectError):
        return f"{hive} hive: {exc}"
    if exc.reason and "program not found" in exc.reason:
        return "hivexget is not installed, registry not read"
    if exc.timed_out:
        return f"{hive} hive: hivexget timed out"
    if "failed to open hive file" in exc.stderr:
        return f"{hive} is not a valid registry hive ({exc.stderr_tail})"
    return f"{hive} hive: cannot read {key} ({exc.stderr_tail or f'exit {exc.returncode}'})"


def read_hive_key(hive_path: str, key: str) -> dict[str, RegistryValue]:
    """All string and DWORD values of `key` in the hive file at `hive_path`."""
    result = commands.run(["hivexget", hive_path, key], timeout=HIVEXGET_TIMEOUT_S)
    return parse_hivexget_key(result.stdout)


def _hive(fs: GuestFS, systemroot: str, name: str, notes: list[str]) -> str | None:
    # A FIFO or symlink at a hive's name would hang or mislead hivexget: refused.
    return _regular_hive(fs, systemroot, name, notes)


def read_windows_version(fs: GuestFS, systemroot: str, notes: list[str]) -> WindowsVersion | None:
    hive = _hive(fs, systemroot, "SOFTWARE", notes)
    if hive is None:
        return None
    try:
        return windows_version_from_values(read_hive_key(hive, CURRENT_VERSION_KEY))
    except (CommandError, InspectError) as exc:
        notes.append(_failure("SOFTWARE", CURRENT_VERSION_KEY, exc))
        return None


def read_windows_hostname(fs: GuestFS, systemroot: str, notes: list[str]) -> str | None:
    hive = _hive(fs, systemroot, "SYSTEM", notes)
    if hive is None:
        return None
    # The running control set is the one Select\Current names; 1 is the usual one.
    control_set = 1
    try:
        current = _number(read_hive_key(hive, "Select"), "Current")
        if current is not None and 0 < current < 1000:
            control_set = current
    except (CommandError, InspectError):
        pass  # old or trimmed hives lack Select; ControlSet001 is still worth trying
    key = rf"ControlSet{control_set:03d}\{COMPUTER_NAME_KEY}"
    try:
        return _text(read_hive_key(hive, key), "ComputerName")
    except (CommandError, InspectError) as exc:
        notes.append(_failure("SYSTEM", key, exc))
        return None


def read_windows_arch(fs: GuestFS, systemroot: str, notes: list[str]) -> str | None:
    path = f"{systemroot}/System32/cmd.exe"
    try:
        return parse_pe_arch(fs.head(path, HEADER_BYTES))
    except (GuestPathError, InspectError) as exc:
        notes.append(f"architecture unknown: {path}: {exc}")
        return None


def inspect_windows(fs: GuestFS, *, root_partition: int) -> OSInfo | None:
    """Inspect the Windows root at `fs.root`; None if it has no Windows directory."""
    fs = _case_insensitive(fs)
    systemroot = find_systemroot(fs)
    if systemroot is None:
        return None
    notes: list[str] = []
    version = read_windows_version(fs, systemroot, notes)
    hostname = read_windows_hostname(fs, systemroot, notes)
    arch = read_windows_arch(fs, systemroot, notes)
    return OSInfo(
        root_partition=root_partition,
        type="windows",
        distro="windows",
        product_name=version.product_name if version else None,
        major=version.major if version else None,
        minor=version.minor if version else None,
        arch=arch,
        hostname=hostname,
        build=version.build if version else None,
        edition=version.edition if version else None,
        notes=tuple(notes),
    )


# --- virtio driver facts (for guestcaps) ----------------------------------------------

# hivexget names the first path component it could not find in this message.
_MISSING_SUBKEY = re.compile(r"subkey '(?P<name>[^']*)' not found")
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _regular_hive(fs: GuestFS, systemroot: str, name: str, notes: list[str]) -> str | None:
    """Host path of hive `name` if it is a regular file, else None with a note.

    hivexget opens the path itself and blocks on a FIFO until its timeout, and a
    symlink at the hive's own name is not what Windows loads: both are refused
    before hivexget runs. Directories above the hive may still be guest symlinks,
    which `fs` resolves inside the guest.
    """
    path = f"{systemroot}/System32/config/{name}"
    try:
        mode = fs.lstat(path).st_mode
        host = fs.resolve(path) if stat.S_ISREG(mode) else None
    except GuestPathError as exc:
        notes.append(f"no {name} hive: {exc.reason}")
        return None
    if host is None:
        notes.append(f"{name} hive is {_file_kind(mode)}, not a regular file: not read")
        return None
    # Checked again on the host path hivexget will open: the residual race is only
    # between this lstat and hivexget's open (the guest is not running meanwhile).
    try:
        unchanged = stat.S_ISREG(os.lstat(host).st_mode)
    except OSError:
        unchanged = False
    if not unchanged:
        notes.append(f"{name} hive changed while being checked: not read")
        return None
    return host


def _current_control_set(hive: str) -> str:
    """The control set Select\\Current names (ControlSet001 without a usable Select).

    Raises CommandError / InspectError when the hive itself cannot be read, so a
    broken hive is reported once rather than as every service missing.
    """
    try:
        current = _number(read_hive_key(hive, "Select"), "Current")
    except CommandError as exc:
        if _missing_subkey(exc) is None:
            raise
        current = None  # old or trimmed hives lack Select; ControlSet001 is the usual one
    if current is None or not 0 < current < 1000:
        current = 1
    return f"ControlSet{current:03d}"


def _missing_subkey(exc: CommandError) -> str | None:
    if exc.returncode is None:
        return None
    match = _MISSING_SUBKEY.search(exc.stderr)
    return match.group("name") if match else None


def _service_values(
    hive: str, key: str, service: str, notes: list[str]
) -> dict[str, RegistryValue] | None:
    """Values of a service key; None when it is absent (noted unless simply missing)."""
    try:
        return read_hive_key(hive, key)
    except CommandError as exc:
        missing = _missing_subkey(exc)
        # Only the service key itself missing is "not installed"; a missing
        # Services or ControlSet key means the hive is not what we think it is.
        if missing is None or missing.casefold() != service.casefold():
            notes.append(_failure("SYSTEM", key, exc))
        return None
    except InspectError as exc:
        notes.append(_failure("SYSTEM", key, exc))
        return None


def _windows_driver(
    fs: GuestFS, systemroot: str, service: str, *, hive: str, control_set: str, notes: list[str]
) -> WindowsDriver:
    values = _service_values(hive, rf"{control_set}\Services\{service}", service, notes)
    return WindowsDriver(
        service=service,
        registered=values is not None,
        start=None if values is None else _number(values, "Start"),
        sys_file=fs.is_file(f"{systemroot}/System32/drivers/{service}.sys"),
    )


def windows_driver_facts(fs: GuestFS, systemroot: str | None = None) -> WindowsDrivers:
    """The virtio-win drivers (viostor, vioscsi, netkvm) of the Windows root at `fs.root`.

    Each is looked up in the current control set of the SYSTEM hive (its Start
    value) and in System32\\drivers (its .sys file). Nothing here raises for a
    guest that cannot be read: the facts say what was not seen, and why.
    """
    fs = _case_insensitive(fs)
    systemroot = systemroot or find_systemroot(fs)
    if systemroot is None:
        return WindowsDrivers(notes=("no Windows directory with System32/cmd.exe",))
    notes: list[str] = []
    hive = _regular_hive(fs, systemroot, "SYSTEM", notes)
    if hive is None:
        return WindowsDrivers(notes=tuple(notes))
    try:
        control_set = _current_control_set(hive)
    except (CommandError, InspectError) as exc:
        return WindowsDrivers(notes=(_failure("SYSTEM", "Select", exc),))
    drivers = tuple(
        _windows_driver(fs, systemroot, service, hive=hive, control_set=control_set, notes=notes)
        for service in WINDOWS_VIRTIO_SERVICES
    )
    return WindowsDrivers(drivers=drivers, control_set=control_set, notes=tuple(notes))
