"""What to boot for a Linux guest: its own boot loader, or its default kernel directly.

A boot check judges the serial console, so the guest must talk on it. One that was
set up for it (console=ttyS0 on its default kernel command line, a serial getty) is
booted through its own firmware path and boot loader, as it will boot on KVM. One
that was not would show nothing, so its DEFAULT kernel (the boot loader's default
entry, else the newest BLS entry, else the newest /boot/vmlinuz-*) is booted
directly with that entry's own command line plus `console=ttyS0,115200n8`: everything
from the kernel on is the guest's own (its initramfs finding the root by the names
its boot config uses, fstab, units), only the boot loader is bypassed. systemd
starts a getty on the kernel's console by itself, so the check still ends at a login
prompt.

Pure parsers (`grub_default_entry`, `legacy_default_entry`, `bls_default_entry`,
`serial_console_port`, `direct_cmdline`) read text; `boot_plan` and `extract_kernel`
read the guest only through GuestFS, so no guest symlink can reach the host.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vmcraft_tasks.craft.errors import GuestPathError, VMCraftError
from vmcraft_tasks.craft.fixes.bootloader import kernel_cmdlines
from vmcraft_tasks.craft.fixes.distros import Fixer
from vmcraft_tasks.craft.fixes.initramfs_regen import kernel_versions
from vmcraft_tasks.craft.fixes.lvmboot import kernel_args
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.model import OSInfo

Mode = Literal["bootloader", "direct-kernel"]

SERIAL_APPEND = "console=ttyS0,115200n8"
# Distribution kernels are 5-15 MiB and initramfs images 10-150 MiB; the caps only
# stop a hostile guest from filling the host (both are read into memory once).
KERNEL_CAP = 128 * 1024 * 1024
INITRD_CAP = 512 * 1024 * 1024
TEXT_CAP = 1024 * 1024
MAX_DIR_ENTRIES = 10_000

GRUBENV_PATHS = ("/boot/grub/grubenv", "/boot/grub2/grubenv")
GETTY_WANTS_DIRS = (
    "/etc/systemd/system/getty.target.wants",
    "/etc/systemd/system/multi-user.target.wants",
)
INITTAB = "/etc/inittab"
INITRD_NAMES = ("initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}", "initrd-{v}.img")
# bzImage's setup header carries "HdrS" at 0x202: anything else is not a kernel qemu boots.
_BZIMAGE_MAGIC_AT = 0x202
_BZIMAGE_MAGIC = b"HdrS"

_GRUB_KERNEL_COMMANDS = frozenset({"linux", "linux16", "linuxefi", "kernel"})
_GRUB_INITRD_COMMANDS = frozenset({"initrd", "initrd16", "initrdefi"})
_GRUB_DEVICE = re.compile(r"^\([^)]*\)")
_CONTINUED_LINE = re.compile(r"\\\r?\n")
# console=ttyS<n>, whole word, quoted or not (GRUB_CMDLINE_LINUX="... console=ttyS0,...").
_SERIAL_CONSOLE = re.compile(r"""(?<![^\s"'])console=ttyS(\d+)(?![0-9])""")
_SERIAL_GETTY = re.compile(r"^(?:serial-)?getty@ttyS(\d+)\.service$")
_INITTAB_GETTY = re.compile(r"^[^#:\n]*:[^:\n]*:respawn:[^\n]*getty[^\n]*\bttyS(\d+)", re.MULTILINE)
_LEGACY_DEFAULT = re.compile(r"^default[\s=]+(\d+)\b")
_DROPPED_ARGS = re.compile(r"^(BOOT_IMAGE=|console=ttyS)")
# Ports qemu gives the guest (qemu.BootSpec.serial_port): COM1 and COM2.
LOGGED_PORTS = (0, 1)


class BootPlanError(VMCraftError):
    """What to boot cannot be worked out (no kernel, no command line), or not copied."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


@dataclass(frozen=True)
class BootEntry:
    """One boot entry as the boot loader names it: paths on its root device."""

    kernel: str
    initrd: str | None
    args: str  # the kernel arguments, `$variables` dropped
    source: str  # where it came from: a guest file, or "/boot" for the newest kernel
    title: str | None = None


@dataclass(frozen=True)
class GuestBoot:
    mode: Mode
    kernel_path_in_guest: str | None  # as the guest sees it, /boot mounted: /boot/vmlinuz-K
    initrd_path_in_guest: str | None
    cmdline: str | None  # direct-kernel: what qemu's -append gets; else the entry's own
    reason: str
    serial_port: int = 0  # the port the guest's console is on (bootloader mode)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


# --------------------------------------------------------------------------- pure: GRUB 2


@dataclass
class _Node:
    kind: str  # "menuentry" | "submenu"
    title: str
    ident: str | None
    words: list[list[str]] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: GRUB would refuse it, we read on
        return line.split()


def _menu_ident(words: list[str]) -> str | None:
    for flag in ("$menuentry_id_option", "--id"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def _parse_grub_menu(cfg: str) -> tuple[list[_Node], list[str]]:
    """The menu tree of a grub.cfg and its top-level `set default=` values, in order."""
    top: list[_Node] = []
    frames: list[_Node | None] = []  # None: a brace of something else (a function)
    defaults: list[str] = []
    for raw in _CONTINUED_LINE.sub(" ", cfg).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}":
            if frames:
                frames.pop()
            continue
        words = _words(line.rstrip("{").strip() if line.endswith("{") else line)
        if not words:
            continue
        inside = next((f for f in reversed(frames) if f is not None), None)
        if line.endswith("{"):
            if words[0] in ("menuentry", "submenu"):
                title = words[1] if len(words) > 1 else ""
                node = _Node(words[0], title, _menu_ident(words))
                (inside.children if inside is not None else top).append(node)
                frames.append(node)
            else:
                frames.append(None)
            continue
        if inside is not None:
            inside.words.append(words)
        elif words[0] == "set" and len(words) > 1 and words[1].startswith("default="):
            defaults.append(words[1][len("default=") :])
    return top, defaults


def _pick(nodes: list[_Node], default: str) -> _Node | None:
    """The menuentry GRUB boots for `default`: an index, a title or an id, `>`-joined
    through submenus."""
    level = nodes
    for part in default.split(">"):
        chosen: _Node | None = None
        if part.isdigit():
            index = int(part)
            chosen = level[index] if index < len(level) else None
        else:
            chosen = next((n for n in level if part in (n.ident, n.title)), None)
        if chosen is None:
            return None
        if chosen.kind == "menuentry":
            return chosen
        level = chosen.children
    return next((n for n in level if n.kind == "menuentry"), None)


def _loader_path(path: str) -> str:
    # "(hd0,gpt2)/vmlinuz" or "($root)/vmlinuz": the device is the boot loader's business.
    return _GRUB_DEVICE.sub("", path) or "/"


def _plain(words: Iterable[str]) -> list[str]:
    return [w for w in words if "$" not in w]


def _entry_from_words(lines: list[list[str]], source: str, title: str | None) -> BootEntry | None:
    kernel: str | None = None
    args: list[str] = []
    initrd: str | None = None
    for words in lines:
        if words[0] in _GRUB_KERNEL_COMMANDS and len(words) > 1 and kernel is None:
            kernel, args = _loader_path(words[1]), _plain(words[2:])
        elif words[0] in _GRUB_INITRD_COMMANDS:
            # Microcode images come first; the initramfs proper is the last one.
            paths = _plain(words[1:])
            initrd = _loader_path(paths[-1]) if paths else initrd
    if kernel is None:
        return None
    return BootEntry(kernel, initrd, " ".join(args), source, title)


def parse_grubenv(text: str) -> dict[str, str]:
    """GRUB's environment block as key -> value (pure)."""
    env = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


def _default_value(defaults: Sequence[str], saved_entry: str | None) -> str:
    # Debian's grub.cfg sets default="${next_entry}" only when a one-time entry was
    # asked for; the plain `set default=` after it is the one that holds.
    value = "0"
    for candidate in defaults:
        if "next_entry" in candidate:
            continue
        if "saved_entry" in candidate:
            value = saved_entry or "0"
        elif "$" not in candidate:
            value = candidate
    return value


def grub_default_entry(
    cfg: str, saved_entry: str | None = None, *, source: str = "grub.cfg"
) -> BootEntry | None:
    """The entry a GRUB 2 grub.cfg boots by default, or None if it has no such entry
    (a BLS config, `blscfg`, lists its entries elsewhere) (pure)."""
    nodes, defaults = _parse_grub_menu(cfg)
    node = _pick(nodes, _default_value(defaults, saved_entry))
    if node is None:
        return None
    return _entry_from_words(node.words, source, node.title)


def uses_bls(cfg: str) -> bool:
    """True if a grub.cfg takes its menu from BLS entries (`blscfg`) (pure)."""
    return any(_words(line.strip())[:1] == ["blscfg"] for line in cfg.splitlines())


# --------------------------------------------------------------------------- pure: GRUB legacy


def legacy_default_entry(menu: str, *, source: str = "menu.lst") -> BootEntry | None:
    """The default entry of a GRUB legacy menu.lst / grub.conf (pure)."""
    default = 0
    entries: list[tuple[str, list[list[str]]]] = []
    for raw in menu.splitlines():
        line = raw.strip()
        if not entries and (match := _LEGACY_DEFAULT.match(line)):
            default = int(match.group(1))  # "default saved" and the like: the first
            continue
        words = _words(line)
        if not words:
            continue
        if words[0] == "title":
            entries.append((line[len("title") :].strip(), []))
        elif entries:
            entries[-1][1].append(words)
    if not entries:
        return None
    title, lines = entries[default] if default < len(entries) else entries[0]
    return _entry_from_words(lines, source, title)


# --------------------------------------------------------------------------- pure: BLS


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # Numbers compare as numbers, so 6.10 sorts after 6.9.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+~_-]", version)
    )


def _bls_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and not parts[0].startswith("#"):
            fields.setdefault(parts[0], []).append(parts[1].strip())
    return fields


def bls_default_entry(
    entries: Mapping[str, str],
    *,
    saved_entry: str | None = None,
    kernelopts: str | None = None,
    directory: str = "/boot/loader/entries",
) -> BootEntry | None:
    """The BLS entry booted by default: the saved one, else the newest that is not a
    rescue entry (GRUB's blscfg sorts by version, newest first) (pure).

    `entries` maps file names (`<machine-id>-<version>.conf`) to their text;
    `kernelopts` is grubenv's, which RHEL 8 entries name as `$kernelopts`.
    """
    parsed = []
    for name, text in entries.items():
        fields = _bls_fields(text)
        if "linux" not in fields:
            continue
        stem = name[: -len(".conf")] if name.endswith(".conf") else name
        version = (fields.get("version") or [stem])[0]
        rescue = "rescue" in stem or "rescue" in " ".join(fields.get("title", []))
        parsed.append((stem, version, rescue, fields))
    if not parsed:
        return None
    chosen = next((p for p in parsed if saved_entry and p[0] == saved_entry), None)
    if chosen is None:
        ordered = sorted(parsed, key=lambda p: (not p[2], _version_key(p[1]), p[0]))
        chosen = ordered[-1]
    stem, _version, _rescue, fields = chosen
    options = " ".join(fields.get("options", []))
    if kernelopts is not None:
        options = options.replace("$kernelopts", kernelopts)
    initrds = _plain(" ".join(fields.get("initrd", [])).split())
    return BootEntry(
        kernel=fields["linux"][0].split()[0],
        initrd=initrds[-1] if initrds else None,
        args=" ".join(_plain(options.split())),
        source=f"{directory}/{stem}.conf",
        title=fields["title"][0] if "title" in fields else None,
    )


# --------------------------------------------------------------------------- pure: console


def serial_console_port(
    cmdlines: Sequence[str], getty_units: Iterable[str], inittab: str | None
) -> int | None:
    """The serial port (0 or 1) the guest talks on by itself, or None (pure).

    `cmdlines`: the default entry's command line (or, when the entry is unknown, the
    GRUB_CMDLINE_LINUX(_DEFAULT) values); `getty_units`: the unit names enabled in
    getty.target.wants and multi-user.target.wants; `inittab`: /etc/inittab's text.
    """
    found: set[int] = set()
    for cmdline in cmdlines:
        found |= {int(n) for n in _SERIAL_CONSOLE.findall(cmdline)}
    for unit in getty_units:
        if match := _SERIAL_GETTY.match(unit):
            found.add(int(match.group(1)))
    if inittab:
        found |= {int(n) for n in _INITTAB_GETTY.findall(inittab)}
    return next((port for port in LOGGED_PORTS if port in found), None)


def serial_console_configured(
    cmdlines: list[str], getty_units: set[str], inittab: str | None
) -> bool:
    """True if the guest shows its boot or a login on ttyS0/ttyS1 by itself (pure).

    GRUB_TERMINAL=serial alone does not count: it puts GRUB's menu on the serial
    port, not the kernel or a getty, so the console would fall silent after GRUB.
    """
    return serial_console_port(cmdlines, getty_units, inittab) is not None


def direct_cmdline(args: str) -> str:
    """The command line for booting an entry's kernel directly: its own arguments
    (root=, ro, LVM and resume names...) and the serial console last, so that
    /dev/console and systemd's status output are on ttyS0 (pure)."""
    kept = [a for a in kernel_args(args) if not _DROPPED_ARGS.match(a)]
    return " ".join([*kept, SERIAL_APPEND])


def newest_kernel_version(boot_names: Iterable[str]) -> str | None:
    """The newest K of /boot's vmlinuz-K entries (pure)."""
    versions = kernel_versions(boot_names)
    return versions[-1] if versions else None


def fallback_cmdline(
    default_grub: str | None, kernel_cmdline: str | None, root_spec: str | None
) -> str | None:
    """A command line for a kernel no boot loader entry names: /etc/kernel/cmdline,
    else GRUB's defaults, with the fstab root as root= when they name none (pure)."""
    if kernel_cmdline and kernel_cmdline.strip():
        args = kernel_args(kernel_cmdline.strip().splitlines()[0])
    elif default_grub:
        values = kernel_cmdlines(default_grub, "grub-default")
        args = [arg for value in values for arg in kernel_args(value)]
    else:
        args = []
    if not any(a.startswith("root=") for a in args):
        if root_spec is None:
            return None
        args.insert(0, f"root={root_spec}")
    if not any(a in ("ro", "rw") for a in args):
        args.insert(1, "ro")
    return " ".join(args)


# --------------------------------------------------------------------------- edge: the guest


class _Tree:
    """The guest's tree as it boots: its root, with a separate /boot filesystem at /boot."""

    def __init__(self, root: GuestFS, boot: GuestFS | None) -> None:
        self.root = root
        self.boot = boot

    def where(self, path: str) -> tuple[GuestFS, str]:
        if self.boot is not None and (path == "/boot" or path.startswith("/boot/")):
            return self.boot, path[len("/boot") :] or "/"
        return self.root, path

    def is_file(self, path: str) -> bool:
        fs, inner = self.where(path)
        return fs.is_file(inner)

    def text(self, path: str, notes: list[str]) -> str | None:
        fs, inner = self.where(path)
        if not fs.is_file(inner):
            return None
        try:
            return fs.cat(inner, max_size=TEXT_CAP)
        except GuestPathError as exc:
            notes.append(f"{path}: not read ({exc.reason})")
            return None

    def names(self, path: str, notes: list[str]) -> list[str]:
        fs, inner = self.where(path)
        if not fs.is_dir(inner):
            return []
        try:
            return fs.ls(inner, limit=MAX_DIR_ENTRIES)
        except GuestPathError as exc:
            notes.append(f"{path}: not listed ({exc.reason})")
            return []

    def read(self, path: str, cap: int) -> bytes:
        fs, inner = self.where(path)
        return fs.read_file(inner, max_size=cap)

    def locate(self, loader_path: str) -> str | None:
        """The guest path of a file a boot loader names on its own root device: /boot
        when that is a filesystem of its own, else the root."""
        path = "/" + loader_path.lstrip("/")
        candidates = [path] if path.startswith("/boot/") else []
        candidates += ["/boot" + path, path]
        return next((c for c in candidates if self.is_file(c)), None)


def _loader_entry(tree: _Tree, notes: list[str]) -> BootEntry | None:
    """The boot loader's default entry: grub.cfg, BLS entries, or GRUB legacy's menu."""
    env: dict[str, str] = {}
    for path in GRUBENV_PATHS:
        if (text := tree.text(path, notes)) is not None:
            env = parse_grubenv(text)
            break
    saved = env.get("saved_entry")
    bls = False
    for path in Fixer.grub_cfg_paths:
        if (text := tree.text(path, notes)) is None:
            continue
        if path.endswith((".lst", ".conf")):
            if entry := legacy_default_entry(text, source=path):
                return entry
            continue
        if uses_bls(text):
            bls = True
            continue
        if entry := grub_default_entry(text, saved, source=path):
            return entry
    for directory in Fixer.bls_entries_dirs:
        names = [n for n in tree.names(directory, notes) if n.endswith(".conf")]
        texts = {n: t for n in names if (t := tree.text(f"{directory}/{n}", notes)) is not None}
        if texts:
            return bls_default_entry(
                texts, saved_entry=saved, kernelopts=env.get("kernelopts"), directory=directory
            )
    if bls:
        notes.append("grub.cfg reads BLS entries (blscfg), but none were found")
    return None


def _getty_units(tree: _Tree, notes: list[str]) -> set[str]:
    return {name for d in GETTY_WANTS_DIRS for name in tree.names(d, notes)}


def _root_spec(os_info: OSInfo) -> str | None:
    return next((r.entry.spec for r in os_info.fstab if r.entry.mountpoint == "/"), None)


def _newest_kernel(tree: _Tree, os_info: OSInfo, notes: list[str]) -> BootEntry | None:
    version = newest_kernel_version(tree.names("/boot", notes))
    if version is None:
        return None
    kernel = next(
        (p for p in (f"/boot/vmlinuz-{version}", f"/boot/vmlinux-{version}") if tree.is_file(p)),
        None,
    )
    if kernel is None:
        return None
    initrds = [f"/boot/{name.format(v=version)}" for name in INITRD_NAMES]
    initrd = next((path for path in initrds if tree.is_file(path)), None)
    cmdline = fallback_cmdline(
        tree.text(Fixer.default_grub_path, notes),
        tree.text(Fixer.kernel_cmdline_path, notes),
        _root_spec(os_info),
    )
    if cmdline is None:
        return None
    return BootEntry(kernel, initrd, cmdline, "/boot", f"newest kernel {version}")


def boot_plan(root_fs: GuestFS, boot_fs: GuestFS | None, os_info: OSInfo) -> GuestBoot:
    """How to boot this Linux guest for a check: through its boot loader when it has a
    serial console, else its default kernel directly (see the module doc).

    `root_fs` is the guest's root, `boot_fs` its /boot when that is a filesystem of its
    own (None when /boot is part of the root, or already mounted inside it).
    """
    if os_info.type != "linux":
        raise BootPlanError(f"a {os_info.type} guest has no Linux kernel to plan a boot for")
    tree = _Tree(root_fs, boot_fs)
    notes: list[str] = []
    entry = _loader_entry(tree, notes)
    if entry is not None:
        cmdlines = [entry.args]
    else:
        default_grub = tree.text(Fixer.default_grub_path, notes) or ""
        cmdlines = kernel_cmdlines(default_grub, "grub-default")
    inittab = tree.text(INITTAB, notes)
    port = serial_console_port(cmdlines, _getty_units(tree, notes), inittab)
    kernel = tree.locate(entry.kernel) if entry is not None else None
    initrd = tree.locate(entry.initrd) if entry is not None and entry.initrd else None
    if port is not None:
        where = f"the default entry of {entry.source}" if entry else "the guest's configuration"
        return GuestBoot(
            "bootloader",
            kernel,
            initrd,
            entry.args if entry else None,
            f"the guest has a serial console on ttyS{port} ({where}): booted through its "
            "own boot loader",
            port,
            tuple(notes),
        )
    if entry is None or kernel is None:
        if entry is not None:
            notes.append(f"{entry.source}: its default kernel {entry.kernel} is not in the guest")
        entry = _newest_kernel(tree, os_info, notes)
        kernel = entry.kernel if entry is not None else None
        initrd = entry.initrd if entry is not None else None
    if entry is None or kernel is None:
        raise BootPlanError(
            "no serial console configured and no kernel to boot directly: no boot loader "
            "entry names one that exists, and /boot has no vmlinuz-K with a root to give it"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    if entry.initrd and initrd is None:
        notes.append(f"{entry.source}: its initrd {entry.initrd} is not in the guest")
    cmdline = direct_cmdline(entry.args)
    return GuestBoot(
        "direct-kernel",
        kernel,
        initrd,
        cmdline,
        f"no serial console configured in the guest: its default kernel {kernel} "
        f"({entry.title or entry.source}) booted directly with its own command line "
        f"+ {SERIAL_APPEND}",
        0,
        tuple(notes),
    )


def _write_new(path: str, data: bytes) -> None:
    # Our own work directory; O_NOFOLLOW all the same, and private to us.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def extract_kernel(
    fs: GuestFS, plan: GuestBoot, dest_dir: str, *, boot_fs: GuestFS | None = None
) -> tuple[str, str | None]:
    """Copy the plan's kernel and initrd out of the guest into `dest_dir`: their host
    paths (initrd None when the plan has none). Read through GuestFS with size caps;
    a kernel that is not a bzImage is refused."""
    if plan.kernel_path_in_guest is None:
        raise BootPlanError("the boot plan names no kernel")
    tree = _Tree(fs, boot_fs)
    try:
        kernel = tree.read(plan.kernel_path_in_guest, KERNEL_CAP)
        initrd = (
            tree.read(plan.initrd_path_in_guest, INITRD_CAP)
            if plan.initrd_path_in_guest is not None
            else None
        )
    except GuestPathError as exc:
        raise BootPlanError(f"cannot copy it out of the guest: {exc.reason}", exc.path) from exc
    magic = kernel[_BZIMAGE_MAGIC_AT : _BZIMAGE_MAGIC_AT + len(_BZIMAGE_MAGIC)]
    if magic != _BZIMAGE_MAGIC:
        raise BootPlanError("not a bzImage kernel qemu can boot", plan.kernel_path_in_guest)
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    kernel_path = os.path.join(dest_dir, "vmlinuz")
    _write_new(kernel_path, kernel)
    initrd_path = None
    if initrd is not None:
        initrd_path = os.path.join(dest_dir, "initrd.img")
        _write_new(initrd_path, initrd)
    return kernel_path, initrd_path
