"""Rebuild a converted Linux guest's initramfs offline, with the guest's own generator.

Writing virtio into the generator's config (`fixes.initramfs`) is not enough: the
initramfs already on disk still lacks virtio_blk, and the VM cannot boot on KVM to
rebuild it. So we rebuild it here, on the conversion host, by running the guest's
own generator (initramfs-tools, dracut or mkinitrd) against the guest's own kernel
modules inside a bubblewrap sandbox (`craft.sandbox`): guest binaries never run on
the host proper.

For every kernel the bootloader can boot (`/boot/vmlinuz-K` with `/lib/modules/K`):

1. list the modules of the current image with the guest's own lister (lsinitramfs,
   lsinitrd; a `cpio -t` pipeline for old mkinitrd guests), in a read-only sandbox;
2. skip it when virtio_blk and virtio_pci are already there (or built into the
   kernel), unless `force`: rebuilding a bootable image only adds risk;
3. copy the image to `<initrd>.pre-vmcraft` (through GuestFS);
4. build the new image at `<initrd>.vmcraft-new`, never over the live one;
5. list the new image and require virtio_blk and virtio_pci (in it or built in:
   virtio_blk without its PCI transport never sees the disk, and modprobe does not
   pull the transport in as a dependency);
6. only then rename it over the live image (keeping the live one's mode and
   xattrs) and drop the backup.

Any failure restores the live image from the backup when it changed (a guest hook
may have written it), removes the temporary, and raises `InitramfsError` carrying
the generator's output tail. The live image is only ever replaced by one atomic
rename, so an interrupted run leaves the old image or the new verified one.

Decisions:

- Errors, not result records: refusals (no generator, another architecture, no
  kernel) raise `InitramfsRefused`, failed rebuilds raise `InitramfsError`; both
  carry `reason` and the report of what was done so far (`report`). Callers turn a
  raised error into the VM's failure reason. A kernel rebuilt and verified before a
  later kernel failed keeps its new image: it is strictly better than the old one.
- Backup dropped after a verified install: the old image lacks virtio, so it cannot
  boot this VM on KVM; /boot is often small and a second copy of every initramfs can
  make the guest's next kernel update fail for lack of space; and the untouched
  source disk is the real way back. The backup covers the rebuild itself: a guest
  hook that writes the live image, a crash before the rename. It is a copy, not a
  hard link, since a hook writing the live file in place would change a link too.
- dracut runs with `--no-hostonly --no-hostonly-cmdline`: hostonly mode probes the
  machine it runs on, which here is the conversion host, not the guest (and would
  store its root= and kernel command line); `--add-drivers` names the virtio block
  drivers so the result does not depend on the guest's dracut.conf.d.
- initramfs-tools with `MODULES=dep` detects the root disk's driver from /sys and
  /proc of the machine it runs on; in the sandbox that is nothing (or the wrong
  host). Such guests, and guests whose MODULES=list/netboot config lacks the virtio
  block drivers, are built by `mkinitramfs -d` with a temporary copy of
  /etc/initramfs-tools (inside the sandbox's /tmp) that says MODULES=most and lists
  the missing drivers. The guest's own config is left alone, and the report says so.
- A root (or /usr) on LVM (`needs_lvm`): the image must activate LVM before the root
  exists. dracut gets `--add lvm` (--no-hostonly would include the module anyway when
  the guest has lvm, but hostonly detection could never see LVM: nothing is active in
  the sandbox; named, a guest that cannot include it fails loudly); initramfs-tools'
  lvm2 hook copies lvm by itself. A guest that cannot (no lvm2, its dracut.conf omits
  the module, no lvm2 hook) is refused before anything is built, naming the file and
  what is needed, and every new image must list the lvm binary to be installed.
- The backup is copied, and the new image renamed, through GuestFS paths (guest
  symlinks resolved inside the guest, final names never followed); guest programs
  write only inside the sandbox. Listings have their own time limit
  (LIST_TIMEOUT_S); `timeout_s` bounds each generator run.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vmcraft_tasks.craft.commands import CommandResult
from vmcraft_tasks.craft.errors import CommandError, GuestPathError, VMCraftError
from vmcraft_tasks.craft.fixes.initramfs import ensure_initramfs_modules
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.arch import detect_linux_arch
from vmcraft_tasks.craft.sandbox import SandboxError, bwrap_path, check_root, run_sandboxed

# What the rebuilt image must be able to load before the root filesystem exists.
VIRTIO_BOOT_MODULES = ("virtio_blk", "virtio_pci")
# What we ask the generator to add (virtio_scsi too: a disk may sit on virtio-scsi).
VIRTIO_BLOCK_DRIVERS = ("virtio_blk", "virtio_pci", "virtio_scsi")
# An image that activates LVM holds the lvm binary (paths as listers print them).
LVM_BINARIES = ("usr/sbin/lvm", "sbin/lvm", "usr/bin/lvm", "bin/lvm")
DRACUT_LVM_MODULE = "lvm"
LVM2_HOOK = "/usr/share/initramfs-tools/hooks/lvm2"
DRACUT_CONF = "/etc/dracut.conf"
# dracut sources /etc/dracut.conf, then *.conf of these by name (/etc's masking /usr/lib's).
DRACUT_CONF_DIRS = ("/usr/lib/dracut/dracut.conf.d", "/etc/dracut.conf.d")
DRACUT_MODULES_DIR = "/usr/lib/dracut/modules.d"

BACKUP_SUFFIX = ".pre-vmcraft"
NEW_SUFFIX = ".vmcraft-new"
LIST_TIMEOUT_S = 120.0
# Debian's MODULES=most images are ~30 MiB, dracut --no-hostonly ones up to ~100 MiB.
IMAGE_CAP = 1024 * 1024 * 1024
CONF_CAP = 1024 * 1024
OUTPUT_TAIL_LINES = 20
# Inside the sandbox's private /tmp: gone with the sandbox, never in the guest.
TEMP_CONFDIR = "/tmp/vmcraft-initramfs-conf"
OVERRIDE_CONF_NAME = "zz-vmcraft-modules"

# A kernel version becomes a path component and a generator argument: no slashes,
# no leading dash (option injection), nothing a shell would care about.
_KERNEL_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+~-]*$")
_KERNEL_PREFIXES = ("vmlinuz-", "vmlinux-")
_MODULE_FILE = re.compile(r"^(?P<name>[^/]+?)\.ko(?:\.(?:xz|zst|gz|bz2|lz4))?$")
_MODULES_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?MODULES=(?P<value>.*)$")
# mkinitramfs sources only conf.d names like these (see its maybe_add_conf).
_CONFD_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")
_OMIT_DRACUTMODULES = re.compile(r"^\s*omit_dracutmodules(?P<add>\+?)=(?P<value>.*)$")
_LVM_PROGRAMS = ("/usr/sbin/lvm", "/sbin/lvm")

# uname -m spellings and distribution spellings of one architecture.
_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "i486": "i386",
    "i586": "i386",
    "i686": "i386",
    "x86": "i386",
    "ppc64el": "ppc64le",
}


class Generator(enum.StrEnum):
    INITRAMFS_TOOLS = "initramfs-tools"
    DRACUT = "dracut"
    MKINITRD = "mkinitrd"


Action = Literal["rebuilt", "up-to-date", "would-rebuild", "would-skip", "failed"]
Outcome = Literal["rebuilt", "up-to-date", "dry-run", "failed"]
# Actions for which a config override was (or would be) used.
_BUILDS = frozenset({"rebuilt", "would-rebuild", "failed"})


# --- errors ------------------------------------------------------------------------


class InitramfsError(VMCraftError):
    """The initramfs could not be listed or rebuilt; `reason` says why.

    `kernel` names the kernel that failed (None when it is not about one kernel),
    `output_tail` the end of the generator's or lister's output, and `report` what
    was done before the failure (kernels already rebuilt stay rebuilt).
    """

    def __init__(
        self,
        reason: str,
        *,
        kernel: str | None = None,
        output_tail: str = "",
        report: InitramfsReport | None = None,
    ) -> None:
        self.reason = reason
        self.kernel = kernel
        self.output_tail = output_tail
        self.report = report
        super().__init__(reason if not output_tail else f"{reason}: {output_tail}")


class InitramfsRefused(InitramfsError):
    """Nothing was attempted: no generator, another architecture, no bootable kernel."""


# --- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestKernel:
    """A kernel the bootloader can boot: `/boot/vmlinuz-K` with `/lib/modules/K`."""

    version: str
    vmlinuz: str  # guest path
    default: bool = False  # what /vmlinuz or /boot/vmlinuz points at (or the newest)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "vmlinuz": self.vmlinuz, "default": self.default}


@dataclass(frozen=True)
class GeneratorInfo:
    """The guest's initramfs generator: which one, and the guest paths of its tools."""

    kind: Generator
    program: str
    lister: str | None  # None: list with a sandboxed decompress | cpio -t pipeline
    suse: bool = False  # mkinitrd flavour: SUSE's -k/-i/-m, or RHEL 5's nash one

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "program": self.program, "lister": self.lister}


@dataclass(frozen=True)
class KernelResult:
    """What happened (or would happen, in a dry run) to one kernel's initramfs."""

    kernel: str
    initrd: str  # guest path of the live image
    generator: str
    action: Action
    modules_before: frozenset[str]
    modules_after: frozenset[str] | None  # the live image afterwards; None if not known
    virtio_blk_before: bool
    virtio_blk_after: bool | None
    builtin: bool  # virtio_blk is built into the kernel
    backup: str | None  # guest path of a backup that is kept (never, after success)
    verified: bool
    seconds: float
    output_tail: str = ""
    reason: str | None = None
    notes: tuple[str, ...] = ()
    # Whether the image holds the lvm binary, when the root needs LVM (None: not asked).
    lvm_before: bool | None = None
    lvm_after: bool | None = None

    @property
    def ok(self) -> bool:
        return self.action != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "initrd": self.initrd,
            "generator": self.generator,
            "action": self.action,
            "ok": self.ok,
            "modules_before": sorted(self.modules_before),
            "modules_after": None if self.modules_after is None else sorted(self.modules_after),
            "virtio_blk_before": self.virtio_blk_before,
            "virtio_blk_after": self.virtio_blk_after,
            "builtin": self.builtin,
            "backup": self.backup,
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
            "output_tail": self.output_tail,
            "reason": self.reason,
            "notes": list(self.notes),
            "lvm_before": self.lvm_before,
            "lvm_after": self.lvm_after,
        }


@dataclass(frozen=True)
class InitramfsReport:
    """The outcome for every bootable kernel of one guest."""

    outcome: Outcome
    dry_run: bool
    generator: str
    arch: str
    modules_policy: str | None  # initramfs-tools' MODULES setting; None for others
    kernels: tuple[KernelResult, ...] = ()
    notes: tuple[str, ...] = ()
    lvm: str | None = None  # what was (would be) done so the images activate LVM

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "generator": self.generator,
            "arch": self.arch,
            "modules_policy": self.modules_policy,
            "kernels": [kernel.to_dict() for kernel in self.kernels],
            "notes": list(self.notes),
            "lvm": self.lvm,
        }


# --- pure: names and listings ------------------------------------------------------


def normalise_module(name: str) -> str:
    """`.../virtio-blk.ko.zst` or `virtio-blk` -> `virtio_blk`, as modprobe compares them."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    match = _MODULE_FILE.match(base)
    if match:
        base = match.group("name")
    return base.replace("-", "_")


def parse_initramfs_listing(text: str, kernel: str | None = None) -> frozenset[str]:
    """Module names in a listing by lsinitramfs, lsinitrd or `cpio -t` (pure).

    lsinitramfs and cpio print one path per line; lsinitrd prints a header and then
    `ls -l`-style lines, where the path is the last field (before ` -> ` for a
    symlink). Only `.ko*` files under a `lib/modules/` directory count, and with
    `kernel` only that kernel's.
    """
    wanted = "lib/modules/" + (f"{kernel}/" if kernel else "")
    found = set()
    for line in text.splitlines():
        fields = line.split(" -> ", 1)[0].split()
        if not fields:
            continue
        path = fields[-1]
        if wanted not in path:
            continue
        match = _MODULE_FILE.match(path.rsplit("/", 1)[-1])
        if match:
            found.add(match.group("name").replace("-", "_"))
    return frozenset(found)


def parse_initramfs_files(text: str, wanted: Iterable[str]) -> frozenset[str]:
    """Which of the `wanted` paths (`usr/sbin/lvm`) a listing by lsinitramfs, lsinitrd or
    `cpio -t` holds; leading `./` and `/` do not count, a symlink counts (pure)."""
    wanted = frozenset(wanted)
    found = set()
    for line in text.splitlines():
        fields = line.split(" -> ", 1)[0].split()
        if not fields:
            continue
        path = fields[-1]
        while path.startswith(("./", "/")):
            path = path[1:] if path.startswith("/") else path[2:]
        if path in wanted:
            found.add(path)
    return frozenset(found)


def parse_modules_builtin(text: str) -> frozenset[str]:
    """Module names in /lib/modules/K/modules.builtin (`kernel/.../x.ko` lines) (pure)."""
    return frozenset(normalise_module(line.strip()) for line in text.splitlines() if line.strip())


def missing_boot_modules(modules: Iterable[str], builtin: Iterable[str]) -> tuple[str, ...]:
    """The VIRTIO_BOOT_MODULES neither in the image nor built into the kernel (pure)."""
    present = set(modules) | set(builtin)
    return tuple(module for module in VIRTIO_BOOT_MODULES if module not in present)


def output_tail(result: CommandResult | CommandError, lines: int = OUTPUT_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of a command's stdout then stderr."""
    text = f"{result.stdout}\n{result.stderr}"
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def normalise_arch(arch: str) -> str:
    name = arch.strip().lower()
    return _ARCH_ALIASES.get(name, name)


def arch_refusal(guest_arch: str | None, host_arch: str) -> str | None:
    """Why guest binaries cannot run on this host, or None when they can (pure)."""
    if guest_arch is None:
        return "the guest's architecture is unknown (no readable ELF binary in the guest)"
    guest, host = normalise_arch(guest_arch), normalise_arch(host_arch)
    if guest != host:
        return (
            f"the guest is {guest} and this host is {host}: its initramfs generator "
            "cannot run here (rebuild it on a host of the guest's architecture)"
        )
    return None


def is_kernel_version(name: str) -> bool:
    return bool(_KERNEL_VERSION.match(name)) and ".." not in name


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # Numbers compare as numbers, so 6.10 sorts after 6.9.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+~-]", version)
    )


def kernel_versions(boot_entries: Iterable[str]) -> list[str]:
    """Kernel versions named by `vmlinuz-K` entries of /boot, sorted oldest first (pure)."""
    versions = set()
    for entry in boot_entries:
        for prefix in _KERNEL_PREFIXES:
            if entry.startswith(prefix) and is_kernel_version(entry[len(prefix) :]):
                versions.add(entry[len(prefix) :])
    return sorted(versions, key=_version_key)


def shell_value(raw: str) -> str:
    """The value of a simple shell assignment's right-hand side (quotes, comments) (pure)."""
    text = raw.strip()
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        return text[1:end] if end > 0 else text[1:]
    words = text.split("#", 1)[0].split()
    return words[0] if words else ""


def modules_policy(conf_texts: Sequence[str]) -> str:
    """initramfs-tools' effective MODULES value from its config files in sourcing order.

    The last assignment wins, as when mkinitramfs sources the files one after the
    other; no assignment at all means mkinitramfs' fallback, `most` (pure).
    """
    policy = "most"
    for text in conf_texts:
        for line in text.splitlines():
            match = _MODULES_ASSIGNMENT.match(line)
            if match:
                policy = shell_value(match.group("value")) or policy
    return policy


def conf_source_order(usr_share_names: Iterable[str], etc_names: Iterable[str]) -> list[str]:
    """Guest paths of the initramfs-tools conf.d files in the order mkinitramfs sources them.

    /usr/share/initramfs-tools/conf.d/X is skipped when /etc/initramfs-tools/conf.d/X
    exists (the /etc file masks it); only names mkinitramfs accepts count (pure).
    """
    etc = sorted(name for name in etc_names if _is_conf_name(name))
    masked = set(etc_names)
    usr = sorted(name for name in usr_share_names if _is_conf_name(name) and name not in masked)
    return [f"/usr/share/initramfs-tools/conf.d/{name}" for name in usr] + [
        f"/etc/initramfs-tools/conf.d/{name}" for name in etc
    ]


def _is_conf_name(name: str) -> bool:
    return bool(_CONFD_NAME.match(name)) and ".dpkg-" not in name


@dataclass(frozen=True)
class ConfigOverride:
    """What a temporary initramfs-tools confdir changes for one build (pure data)."""

    modules_most: bool = False  # MODULES=dep replaced by MODULES=most
    add_modules: tuple[str, ...] = ()  # appended to the temporary `modules` file
    notes: tuple[str, ...] = ()

    @property
    def needed(self) -> bool:
        return self.modules_most or bool(self.add_modules)


def initramfs_tools_override(policy: str, modules_file: str) -> ConfigOverride:
    """How to build a bootable image from this MODULES policy and modules file (pure).

    `dep` would look for the root disk's driver on the conversion host: build with
    `most` instead, which carries every disk driver including virtio. `list` and
    `netboot` only add what is listed: make sure the virtio block drivers are.
    """
    if policy == "dep":
        return ConfigOverride(
            modules_most=True,
            notes=(
                "MODULES=dep detects the root disk's driver on the machine that builds the "
                "image, which here is the sandbox on the conversion host: built with "
                "MODULES=most from a temporary copy of /etc/initramfs-tools instead; the "
                "guest's own config still says MODULES=dep and the guest's next rebuild on "
                "KVM will detect virtio itself",
            ),
        )
    if policy in ("list", "netboot"):
        _, changes = ensure_initramfs_modules(modules_file, VIRTIO_BLOCK_DRIVERS)
        missing = tuple(change.after for change in changes if change.after)
        if missing:
            return ConfigOverride(
                add_modules=missing,
                notes=(
                    f"MODULES={policy} and the guest's modules file lacks "
                    f"{', '.join(missing)}: added them in a temporary copy of "
                    "/etc/initramfs-tools only (the virtio-initramfs fix makes the guest's "
                    "own config say so)",
                ),
            )
    return ConfigOverride()


def dracut_conf_order(usr_lib_names: Iterable[str], etc_names: Iterable[str]) -> list[str]:
    """Guest paths of dracut's config files in the order dracut sources them (pure):
    /etc/dracut.conf, then the *.conf of both conf.d directories sorted by name, where
    /etc/dracut.conf.d/X masks /usr/lib/dracut/dracut.conf.d/X."""
    by_name: dict[str, str] = {}
    for directory, names in zip(DRACUT_CONF_DIRS, (usr_lib_names, etc_names), strict=True):
        for name in names:
            if name.endswith(".conf"):
                by_name[name] = f"{directory}/{name}"
    return [DRACUT_CONF, *(by_name[name] for name in sorted(by_name))]


def dracut_omitting(confs: Sequence[tuple[str, str]], module: str) -> str | None:
    """The config file whose omit_dracutmodules leaves `module` omitted, given
    (path, text) in sourcing order; None when the module is not omitted (pure).

    `omit_dracutmodules=` starts the list over, `+=` adds to it, as when dracut
    sources the files one after the other."""
    source: str | None = None
    for path, text in confs:
        for line in text.splitlines():
            match = _OMIT_DRACUTMODULES.match(line)
            if match is None:
                continue
            words = shell_value(match.group("value")).split()
            if module in words:
                source = path
            elif not match.group("add"):
                source = None
    return source


def lvm_refusal(
    kind: Generator,
    needs_lvm: str,
    *,
    has_lvm: bool,
    has_dracut_module: bool | None,
    omitted_by: str | None,
    has_lvm2_hook: bool,
) -> str | None:
    """Why this guest cannot build an image that activates LVM, or None (pure).

    `needs_lvm` says why it must ("/ is on LV rl/root"); the rest are facts of the
    guest: an lvm binary, dracut's lvm module (None: no modules directory to tell),
    the dracut config omitting it, initramfs-tools' lvm2 hook."""
    if kind is Generator.DRACUT:
        if omitted_by is not None:
            return (
                f"{needs_lvm}, but {omitted_by} omits the dracut module {DRACUT_LVM_MODULE} "
                f"(omit_dracutmodules): remove {DRACUT_LVM_MODULE} from omit_dracutmodules "
                "there so the initramfs can activate LVM"
            )
        if not has_lvm:
            return (
                f"{needs_lvm}, but the guest has no lvm binary ({' or '.join(_LVM_PROGRAMS)}): "
                "install lvm2 in the guest so dracut can put LVM in its initramfs"
            )
        if has_dracut_module is False:
            return (
                f"{needs_lvm}, but the guest's dracut has no {DRACUT_LVM_MODULE} module "
                f"(no {DRACUT_MODULES_DIR}/*{DRACUT_LVM_MODULE}): install dracut's lvm "
                "module (lvm2 / dracut) in the guest"
            )
    if kind is Generator.INITRAMFS_TOOLS and not has_lvm2_hook:
        return (
            f"{needs_lvm}, but the guest has no {LVM2_HOOK}: install lvm2 in the guest "
            "(its initramfs-tools hook puts lvm in the initramfs)"
        )
    return None


def lvm_note(kind: Generator, needs_lvm: str, *, dry_run: bool) -> str:
    """What the rebuild does (would do) about LVM, for the report (pure)."""
    if kind is Generator.DRACUT:
        done = "would add" if dry_run else "added"
        return (
            f"{needs_lvm}: {done} the dracut module {DRACUT_LVM_MODULE} "
            f"(--add {DRACUT_LVM_MODULE}) and {'would check' if dry_run else 'checked'} "
            "that each new image holds the lvm binary"
        )
    check = "would be checked" if dry_run else "was checked"
    return f"{needs_lvm}: each new image {check} for the lvm binary ({LVM_BINARIES[0]})"


# --- pure: command lines -----------------------------------------------------------

# Run by the guest's /bin/sh inside the sandbox: copy the config to the sandbox's
# private /tmp, apply the override there, build. Positional arguments only, never
# interpolated into the script: $1 program, $2 kernel, $3 output, $4 conf.d text,
# $5... modules to add.
_MKINITRAMFS_WITH_CONF = f"""set -e
conf={TEMP_CONFDIR}
mkdir -p "$conf"
cp -R /etc/initramfs-tools/. "$conf"/
mkdir -p "$conf/conf.d"
if [ -n "$4" ]; then printf '%s\\n' "$4" > "$conf/conf.d/{OVERRIDE_CONF_NAME}"; fi
program=$1 kernel=$2 output=$3
shift 4
# The leading newline ends a last line that has none (harmless when there is one).
if [ "$#" -gt 0 ]; then printf '\\n%s' "$@" >> "$conf/modules"; echo >> "$conf/modules"; fi
exec "$program" -d "$conf" -o "$output" "$kernel"
"""


def generator_argv(
    info: GeneratorInfo,
    kernel: GuestKernel,
    output: str,
    override: ConfigOverride | None = None,
    *,
    lvm: bool = False,
) -> list[str]:
    """The command (guest paths) that builds `kernel`'s initramfs at `output` (pure).

    `lvm`: the image must activate LVM (dracut gets `--add lvm`)."""
    version = kernel.version
    override = override or ConfigOverride()
    if info.kind is Generator.INITRAMFS_TOOLS:
        if not override.needed:
            return [info.program, "-o", output, version]
        conf = "MODULES=most" if override.modules_most else ""
        return [
            "/bin/sh",
            "-c",
            _MKINITRAMFS_WITH_CONF,
            "vmcraft-mkinitramfs",
            info.program,
            version,
            output,
            conf,
            *override.add_modules,
        ]
    drivers = " ".join(VIRTIO_BLOCK_DRIVERS)
    if info.kind is Generator.DRACUT:
        # --no-hostonly: hostonly would probe the conversion host's hardware; and no
        # kernel command line stored from it either (a guest dracut.conf may ask).
        return [
            info.program,
            "--force",
            "--no-hostonly",
            "--no-hostonly-cmdline",
            "--add-drivers",
            drivers,
            *(["--add", DRACUT_LVM_MODULE] if lvm else []),
            "--kver",
            version,
            output,
        ]
    boot_dir, image = os.path.split(output)
    if info.suse:
        # SUSE's mkinitrd takes kernel and initrd names relative to its boot dir.
        return [
            info.program,
            "-b",
            boot_dir,
            "-k",
            os.path.basename(kernel.vmlinuz),
            "-i",
            image,
            "-m",
            drivers,
        ]
    return [
        info.program,
        "-f",
        *(f"--with={driver}" for driver in VIRTIO_BLOCK_DRIVERS),
        output,
        version,
    ]


_DECOMPRESSORS = (
    (b"\x1f\x8b", "gzip -dc"),
    (b"\xfd7zXZ\x00", "xz -dc"),
    (b"\x28\xb5\x2f\xfd", "zstd -dc"),
    (b"BZh", "bzip2 -dc"),
    (b"\x02\x21\x4c\x18", "lz4 -dc"),
    (b"\x89LZO", "lzop -dc"),
    (b"070701", "cat"),
    (b"070702", "cat"),
)


def decompressor_for(head: bytes) -> str | None:
    """The guest command that turns an image starting with `head` into cpio (pure)."""
    for magic, command in _DECOMPRESSORS:
        if head.startswith(magic):
            return command
    return None


def lister_argv(info: GeneratorInfo, image: str, head: bytes) -> list[str]:
    """The command (guest paths) that lists the files of the initramfs `image` (pure)."""
    if info.lister is not None:
        return [info.lister, image]
    decompress = decompressor_for(head)
    if decompress is None:
        raise InitramfsError(f"{image}: not a compressed cpio archive this tool knows")
    # The decompressor is one of ours (a fixed string); the image path is an argument.
    return ["/bin/sh", "-c", f'{decompress} < "$1" | cpio -t', "vmcraft-list", image]


# --- guest discovery ---------------------------------------------------------------

_INITRAMFS_TOOLS = ("/usr/sbin/mkinitramfs", "/sbin/mkinitramfs")
_UPDATE_INITRAMFS = ("/usr/sbin/update-initramfs", "/sbin/update-initramfs")
_LSINITRAMFS = ("/usr/bin/lsinitramfs", "/bin/lsinitramfs", "/usr/sbin/lsinitramfs")
_DRACUT = ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut", "/bin/dracut")
_LSINITRD = ("/usr/bin/lsinitrd", "/usr/sbin/lsinitrd", "/sbin/lsinitrd", "/bin/lsinitrd")
_MKINITRD = ("/sbin/mkinitrd", "/usr/sbin/mkinitrd", "/usr/bin/mkinitrd")
_LOOKED_FOR = "mkinitramfs (initramfs-tools), dracut, mkinitrd"


def _first_program(fs: GuestFS, paths: Sequence[str]) -> str | None:
    for path in paths:
        if fs.is_file(path):
            try:
                if os.stat(fs.resolve(path)).st_mode & 0o111:
                    return path
            except (GuestPathError, OSError):
                continue
    return None


def detect_generator(fs: GuestFS) -> GeneratorInfo | None:
    """The guest's initramfs generator, or None when it has none we can run.

    initramfs-tools when its `update-initramfs` is installed (the package proper;
    it conflicts with dracut), else dracut, else a bare mkinitramfs (Debian keeps
    initramfs-tools-core when dracut replaces initramfs-tools, so mkinitramfs alone
    does not mean it is the generator in use), else mkinitrd. On RHEL 6+ and SUSE
    13+ `mkinitrd` is a wrapper around dracut, which is then found first and run
    directly.
    """
    mkinitramfs = _first_program(fs, _INITRAMFS_TOOLS)
    lsinitramfs = _first_program(fs, _LSINITRAMFS)
    if mkinitramfs is not None and _first_program(fs, _UPDATE_INITRAMFS) is not None:
        return GeneratorInfo(Generator.INITRAMFS_TOOLS, mkinitramfs, lsinitramfs)
    program = _first_program(fs, _DRACUT)
    if program is not None:
        return GeneratorInfo(Generator.DRACUT, program, _first_program(fs, _LSINITRD))
    if mkinitramfs is not None:
        return GeneratorInfo(Generator.INITRAMFS_TOOLS, mkinitramfs, lsinitramfs)
    program = _first_program(fs, _MKINITRD)
    if program is not None:
        suse = fs.is_dir("/lib/mkinitrd")
        return GeneratorInfo(Generator.MKINITRD, program, _first_program(fs, _LSINITRD), suse)
    return None


def _default_kernel(fs: GuestFS, versions: Sequence[str]) -> str | None:
    """The kernel /vmlinuz or /boot/vmlinuz points at (Debian's symlinks), else the newest."""
    for link in ("/vmlinuz", "/boot/vmlinuz"):
        try:
            target = fs.realpath(link)
        except GuestPathError:
            continue
        name = target.rsplit("/", 1)[-1]
        for prefix in _KERNEL_PREFIXES:
            if name.startswith(prefix) and name[len(prefix) :] in versions:
                return name[len(prefix) :]
    return versions[-1] if versions else None


def find_kernels(fs: GuestFS) -> list[GuestKernel]:
    """Kernels the bootloader can boot: `/boot/vmlinuz-K` whose `/lib/modules/K` exists.

    A kernel without modules (a rescue image, a leftover) has nothing for a generator
    to put in an initramfs. Oldest first; `default` marks the one booted by default.
    """
    try:
        entries = fs.ls("/boot")
    except GuestPathError:
        return []
    found: list[tuple[str, str]] = []
    for version in kernel_versions(entries):
        if not fs.is_dir(f"/lib/modules/{version}"):
            continue
        for prefix in _KERNEL_PREFIXES:
            if fs.is_file(f"/boot/{prefix}{version}"):
                found.append((version, f"/boot/{prefix}{version}"))
                break
    default = _default_kernel(fs, [version for version, _ in found])
    return [GuestKernel(version, path, version == default) for version, path in found]


def _is_suse(fs: GuestFS) -> bool:
    if fs.exists("/etc/SuSE-release"):
        return True
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = fs.cat(path, max_size=CONF_CAP).lower()
        except GuestPathError:
            continue
        return "suse" in text
    return False


def initrd_path(fs: GuestFS, info: GeneratorInfo, version: str) -> str:
    """Guest path of `version`'s initramfs: the one that exists, else the distro's name."""
    candidates = (
        f"/boot/initrd.img-{version}",  # Debian, Ubuntu
        f"/boot/initramfs-{version}.img",  # Fedora, RHEL 6+
        f"/boot/initrd-{version}",  # SUSE
        f"/boot/initrd-{version}.img",  # RHEL 5
    )
    for path in candidates:
        if fs.exists(path):
            return path
    if info.kind is Generator.INITRAMFS_TOOLS or fs.exists("/etc/debian_version"):
        return candidates[0]
    if _is_suse(fs):
        return candidates[2]
    if info.kind is Generator.MKINITRD:
        return candidates[3]
    return candidates[1]


def _read_text(fs: GuestFS, path: str) -> str:
    try:
        return fs.cat(path, max_size=CONF_CAP)
    except GuestPathError:
        return ""


def _list_dir(fs: GuestFS, path: str) -> list[str]:
    try:
        return fs.ls(path)
    except GuestPathError:
        return []


def guest_modules_policy(fs: GuestFS) -> str:
    """initramfs-tools' MODULES setting in the guest, sourcing files as mkinitramfs does."""
    order = conf_source_order(
        _list_dir(fs, "/usr/share/initramfs-tools/conf.d"),
        _list_dir(fs, "/etc/initramfs-tools/conf.d"),
    )
    hooks = [
        f"/usr/share/initramfs-tools/conf-hooks.d/{name}"
        for name in _list_dir(fs, "/usr/share/initramfs-tools/conf-hooks.d")
    ]
    paths = ["/etc/initramfs-tools/initramfs.conf", *order, *hooks]
    return modules_policy([_read_text(fs, path) for path in paths])


def guest_listed_modules(fs: GuestFS) -> str:
    """The guest's /etc/initramfs-tools/modules plus /usr/share/initramfs-tools/modules.d/*."""
    texts = [_read_text(fs, "/etc/initramfs-tools/modules")]
    texts += [
        _read_text(fs, f"/usr/share/initramfs-tools/modules.d/{name}")
        for name in _list_dir(fs, "/usr/share/initramfs-tools/modules.d")
    ]
    return "\n".join(texts)


def builtin_modules(root: str, kernel: str) -> frozenset[str]:
    """Modules built into the guest kernel `kernel` (its modules.builtin); empty if unreadable."""
    if not is_kernel_version(kernel):
        return frozenset()
    text = _read_text(GuestFS(root), f"/lib/modules/{kernel}/modules.builtin")
    return parse_modules_builtin(text)


# --- running -----------------------------------------------------------------------


@dataclass
class _Guest:
    """Everything about one guest root that every kernel's rebuild needs."""

    root: str
    fs: GuestFS
    info: GeneratorInfo
    arch: str
    timeout_s: float
    policy: str | None = None
    override: ConfigOverride = field(default_factory=ConfigOverride)
    needs_lvm: str | None = None  # why every image must activate LVM


def _refuse_foreign_arch(fs: GuestFS, arch: str | None) -> str:
    guest_arch = arch or detect_linux_arch(fs)
    reason = arch_refusal(guest_arch, os.uname().machine)
    if reason is not None:
        raise InitramfsRefused(reason)
    assert guest_arch is not None
    return normalise_arch(guest_arch)


def _dracut_confs(fs: GuestFS) -> list[tuple[str, str]]:
    usr_lib, etc = (_list_dir(fs, directory) for directory in DRACUT_CONF_DIRS)
    return [(path, _read_text(fs, path)) for path in dracut_conf_order(usr_lib, etc)]


def _dracut_lvm_module(fs: GuestFS) -> bool | None:
    if not fs.is_dir(DRACUT_MODULES_DIR):
        return None
    names = _list_dir(fs, DRACUT_MODULES_DIR)
    return any(re.fullmatch(rf"\d*{DRACUT_LVM_MODULE}", name) for name in names)


def _refuse_without_lvm(fs: GuestFS, info: GeneratorInfo, needs_lvm: str) -> None:
    dracut = info.kind is Generator.DRACUT
    reason = lvm_refusal(
        info.kind,
        needs_lvm,
        has_lvm=_first_program(fs, _LVM_PROGRAMS) is not None,
        has_dracut_module=_dracut_lvm_module(fs) if dracut else None,
        omitted_by=dracut_omitting(_dracut_confs(fs), DRACUT_LVM_MODULE) if dracut else None,
        has_lvm2_hook=fs.is_file(LVM2_HOOK),
    )
    if reason is not None:
        raise InitramfsRefused(reason)


def _open_guest(root: str, arch: str | None, timeout_s: float) -> _Guest:
    try:
        bwrap_path(root)
        host_root = check_root(root)
    except SandboxError as exc:
        raise InitramfsRefused(exc.reason) from exc
    fs = GuestFS(host_root)
    info = detect_generator(fs)
    if info is None:
        raise InitramfsRefused(
            f"no initramfs generator in the guest (looked for {_LOOKED_FOR}): "
            "cannot rebuild its initramfs offline"
        )
    guest_arch = _refuse_foreign_arch(fs, arch)
    guest = _Guest(host_root, fs, info, guest_arch, timeout_s)
    if info.kind is Generator.INITRAMFS_TOOLS:
        guest.policy = guest_modules_policy(fs)
        guest.override = initramfs_tools_override(guest.policy, guest_listed_modules(fs))
    return guest


@dataclass(frozen=True)
class _Listing:
    modules: frozenset[str]
    lvm: bool  # the image holds the lvm binary


def _list_image(guest: _Guest, kernel: str, image: str) -> _Listing:
    """Modules (and whether lvm is there) in the guest image `image`, listed by the
    guest's own tools, read-only."""
    try:
        head = guest.fs.head(image, 16)
    except GuestPathError as exc:
        raise InitramfsError(f"{image}: {exc.reason}", kernel=kernel) from exc
    argv = lister_argv(guest.info, image, head)
    try:
        result = run_sandboxed(guest.root, argv, timeout=LIST_TIMEOUT_S, writable=False)
    except CommandError as exc:
        what = "timed out" if exc.timed_out else f"exit {exc.returncode}"
        raise InitramfsError(
            f"listing {image} failed ({what})", kernel=kernel, output_tail=output_tail(exc)
        ) from exc
    lvm = bool(parse_initramfs_files(result.stdout, LVM_BINARIES))
    return _Listing(parse_initramfs_listing(result.stdout, kernel), lvm)


def initramfs_modules(root: str, kernel: str, *, arch: str | None = None) -> frozenset[str]:
    """Module names in kernel `kernel`'s current initramfs in the guest mounted at `root`.

    Listed by the guest's own lister inside a read-only sandbox; `arch` is the
    guest's architecture if known (else read from its binaries). Raises
    `InitramfsRefused` when the guest has no generator or another architecture, and
    `InitramfsError` when the image is missing or cannot be listed.
    """
    if not is_kernel_version(kernel):
        raise InitramfsError(f"{kernel!r} is not a kernel version", kernel=kernel)
    guest = _open_guest(root, arch, LIST_TIMEOUT_S)
    image = initrd_path(guest.fs, guest.info, kernel)
    if not guest.fs.is_file(image):
        raise InitramfsError(f"kernel {kernel} has no initramfs ({image} not found)", kernel=kernel)
    return _list_image(guest, kernel, image).modules


@dataclass
class _Before:
    initrd: str
    modules: frozenset[str]
    builtin: frozenset[str]
    exists: bool
    notes: list[str]
    lvm: bool = False  # the image holds the lvm binary


def _look(guest: _Guest, kernel: GuestKernel) -> _Before:
    initrd = initrd_path(guest.fs, guest.info, kernel.version)
    builtin = builtin_modules(guest.root, kernel.version)
    exists = guest.fs.is_file(initrd)
    notes: list[str] = []
    listing = _Listing(frozenset(), lvm=False)
    if not exists:
        notes.append(f"{initrd} does not exist yet")
    else:
        try:
            listing = _list_image(guest, kernel.version, initrd)
        except InitramfsError as exc:
            # An unreadable old image is one more reason to rebuild, not a failure.
            notes.append(f"the current image could not be listed: {exc}")
    return _Before(initrd, listing.modules, builtin, exists, notes, listing.lvm)


def _copy(fs: GuestFS, source: str, target: str, mode: int | None = None) -> None:
    """Copy a guest file to another guest path through GuestFS (atomic at the target)."""
    fs.write_file(target, fs.read_file(source, max_size=IMAGE_CAP), mode=mode)


def _mode(fs: GuestFS, path: str) -> int:
    return fs.lstat(path).st_mode & 0o7777


def _remove_quietly(fs: GuestFS, path: str) -> None:
    if fs.exists(path) or fs.is_symlink(path):
        with contextlib.suppress(GuestPathError):
            fs.remove(path)


def _restore(fs: GuestFS, before: _Before, backup: str | None) -> list[str]:
    """Put the live image back as it was when this run started; notes on what was done."""
    if backup is None:
        if not before.exists and fs.exists(before.initrd):
            _remove_quietly(fs, before.initrd)
            return [f"removed the partial {before.initrd}"]
        return []
    try:
        saved = fs.read_file(backup, max_size=IMAGE_CAP)
        current = (
            fs.read_file(before.initrd, max_size=IMAGE_CAP) if fs.exists(before.initrd) else b""
        )
        if current != saved:
            fs.write_file(before.initrd, saved)
            notes = [f"restored {before.initrd} from {backup}"]
        else:
            notes = [f"{before.initrd} is unchanged"]
    except GuestPathError as exc:
        return [f"could not restore {before.initrd} from {backup} (kept): {exc}"]
    _remove_quietly(fs, backup)
    return notes


class _RebuildFailed(Exception):
    def __init__(self, reason: str, tail: str = "") -> None:
        self.reason = reason
        self.tail = tail
        super().__init__(reason)


def _generate(guest: _Guest, kernel: GuestKernel, new: str) -> str:
    """Build the new image at `new` inside a writable sandbox; its output tail."""
    argv = generator_argv(guest.info, kernel, new, guest.override, lvm=guest.needs_lvm is not None)
    try:
        result = run_sandboxed(guest.root, argv, timeout=guest.timeout_s, writable=True)
    except CommandError as exc:
        if exc.timed_out:
            raise _RebuildFailed(
                f"{guest.info.kind} timed out after {guest.timeout_s:g} s", output_tail(exc)
            ) from exc
        raise _RebuildFailed(
            f"{guest.info.kind} failed (exit {exc.returncode})", output_tail(exc)
        ) from exc
    if not guest.fs.is_file(new):
        raise _RebuildFailed(f"{guest.info.kind} exited 0 but wrote no {new}", output_tail(result))
    return output_tail(result)


def _verify(guest: _Guest, kernel: GuestKernel, new: str, builtin: frozenset[str]) -> _Listing:
    """The new image's listing, if it can load the virtio boot drivers (and activate
    LVM, when the root needs it)."""
    try:
        after = _list_image(guest, kernel.version, new)
    except InitramfsError as exc:
        raise _RebuildFailed(
            f"the new image could not be listed: {exc.reason}", exc.output_tail
        ) from exc
    missing = missing_boot_modules(after.modules, builtin)
    if missing:
        raise _RebuildFailed(
            f"the new image lacks {', '.join(missing)} (neither in it nor built into "
            f"kernel {kernel.version})"
        )
    if guest.needs_lvm is not None and not after.lvm:
        raise _RebuildFailed(
            f"the new image has no lvm binary ({' or '.join(LVM_BINARIES[:2])}), but "
            f"{guest.needs_lvm}: it could not activate the root's VG"
        )
    return after


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_xattrs(dir_fd: int, source: str, target_fd: int) -> None:
    """Best effort: the old image's SELinux label and the like go to the new one."""
    try:
        old = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        for attr in os.listxattr(old):
            with contextlib.suppress(OSError):
                os.setxattr(target_fd, attr, os.getxattr(old, attr))
    except OSError:
        pass
    finally:
        os.close(old)


def _install(fs: GuestFS, new: str, live: str) -> None:
    """Rename the verified `new` image over `live` (same guest directory), atomically.

    A rename rather than a copy: no third copy of the image in a small /boot, and no
    moment with half an image at the live path. The directory is resolved inside the
    guest; rename acts on the two entries and follows neither. The new image gets
    the live one's permission bits and extended attributes.
    """
    directory, new_name = os.path.split(new)
    live_dir, live_name = os.path.split(live)
    if directory != live_dir:
        raise GuestPathError(new, f"not in the same directory as {live}")
    try:
        dir_fd = os.open(fs.resolve(directory), _DIR_FLAGS)
    except OSError as exc:
        raise GuestPathError(directory, f"cannot open: {exc.strerror or exc}") from exc
    try:
        fd = os.open(new_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise GuestPathError(new, "the generator's output is not a regular file")
            old = _stat_at(dir_fd, live_name)
            if old is not None and stat.S_ISREG(old.st_mode):
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
                _copy_xattrs(dir_fd, live_name, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new_name, live_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise GuestPathError(live, f"cannot install the new image: {exc.strerror or exc}") from exc
    finally:
        os.close(dir_fd)


def _stat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _build_and_install(guest: _Guest, kernel: GuestKernel, before: _Before) -> _Built:
    fs, initrd = guest.fs, before.initrd
    new = initrd + NEW_SUFFIX
    _remove_quietly(fs, new)  # a leftover of a killed run
    tail = _generate(guest, kernel, new)
    after = _verify(guest, kernel, new, before.builtin)
    _install(fs, new, initrd)
    return _Built(after, tail)


@dataclass(frozen=True)
class _Built:
    listing: _Listing
    tail: str


def _rebuild(guest: _Guest, kernel: GuestKernel, before: _Before, started: float) -> KernelResult:
    fs, initrd = guest.fs, before.initrd
    backup: str | None = None
    notes = list(before.notes)
    try:
        if before.exists:
            _copy(fs, initrd, initrd + BACKUP_SUFFIX, mode=_mode(fs, initrd))
            backup = initrd + BACKUP_SUFFIX
        built = _build_and_install(guest, kernel, before)
    except (_RebuildFailed, VMCraftError, OSError) as exc:
        reason = exc.reason if isinstance(exc, _RebuildFailed) else str(exc)
        tail = exc.tail if isinstance(exc, _RebuildFailed) else ""
        notes += _undo(fs, before, backup)
        kept = backup if backup and fs.exists(backup) else None
        return _result(
            guest,
            kernel,
            before,
            "failed",
            started,
            backup=kept,
            tail=tail,
            reason=reason,
            notes=notes,
        )
    except BaseException:
        _undo(fs, before, backup)  # interrupted: leave the guest as it was, then go
        raise
    if backup is not None:
        _remove_quietly(fs, backup)
    return _result(
        guest,
        kernel,
        before,
        "rebuilt",
        started,
        after=built.listing,
        verified=True,
        tail=built.tail,
        notes=notes,
    )


def _undo(fs: GuestFS, before: _Before, backup: str | None) -> list[str]:
    _remove_quietly(fs, before.initrd + NEW_SUFFIX)
    return _restore(fs, before, backup)


def _result(
    guest: _Guest,
    kernel: GuestKernel,
    before: _Before,
    action: Action,
    started: float,
    *,
    after: _Listing | None = None,
    verified: bool = False,
    backup: str | None = None,
    tail: str = "",
    reason: str | None = None,
    notes: Sequence[str] = (),
) -> KernelResult:
    asked = guest.needs_lvm is not None
    return KernelResult(
        kernel=kernel.version,
        initrd=before.initrd,
        generator=str(guest.info.kind),
        action=action,
        modules_before=before.modules,
        modules_after=None if after is None else after.modules,
        virtio_blk_before="virtio_blk" in before.modules,
        virtio_blk_after=None if after is None else "virtio_blk" in after.modules,
        builtin="virtio_blk" in before.builtin,
        backup=backup,
        verified=verified,
        seconds=time.monotonic() - started,
        output_tail=tail,
        reason=reason,
        notes=tuple(notes),
        lvm_before=before.lvm if asked and before.exists else None,
        lvm_after=after.lvm if asked and after is not None else None,
    )


def _one_kernel(guest: _Guest, kernel: GuestKernel, *, dry_run: bool, force: bool) -> KernelResult:
    started = time.monotonic()
    before = _look(guest, kernel)
    bootable = before.exists and not missing_boot_modules(before.modules, before.builtin)
    if guest.needs_lvm is not None:
        bootable = bootable and before.lvm
    notes = list(before.notes)
    if dry_run:
        action: Action = "would-skip" if bootable and not force else "would-rebuild"
        return _result(guest, kernel, before, action, started, notes=notes)
    if bootable and not force:
        held = "the virtio boot drivers" + (" and lvm" if guest.needs_lvm else "")
        notes.append(f"the current image already holds {held}: not rebuilt")
        return _result(
            guest,
            kernel,
            before,
            "up-to-date",
            started,
            after=_Listing(before.modules, before.lvm),
            verified=True,
            notes=notes,
        )
    return _rebuild(guest, kernel, before, started)


def _outcome(results: Sequence[KernelResult], dry_run: bool) -> Outcome:
    if dry_run:
        return "dry-run"
    if any(not result.ok for result in results):
        return "failed"
    if any(result.action == "rebuilt" for result in results):
        return "rebuilt"
    return "up-to-date"


def regenerate_initramfs(
    root: str,
    *,
    arch: str | None,
    dry_run: bool,
    timeout_s: float = 600.0,
    force: bool = False,
    needs_lvm: str | None = None,
) -> InitramfsReport:
    """Rebuild the initramfs of every bootable kernel of the guest mounted at `root`.

    `root` is the guest's whole tree (/boot mounted inside it), writable unless
    `dry_run`. `arch` is the guest's architecture from inspection (None: read from
    its binaries). `timeout_s` bounds each generator run. A kernel whose image
    already holds the virtio boot drivers is left alone unless `force`.

    `needs_lvm` says why the images must activate LVM ("/ is on LV rl/root"); then a
    guest that cannot put LVM in its image is refused, dracut gets `--add lvm`, and a
    new image without the lvm binary is not installed.

    A dry run lists the current images and writes nothing. Raises
    `InitramfsRefused` when nothing can be attempted and `InitramfsError` when a
    kernel's rebuild failed (its old image restored; `.report` has every kernel).
    """
    guest = _open_guest(root, arch, timeout_s)
    kernels = find_kernels(guest.fs)
    if not kernels:
        raise InitramfsRefused(
            "no bootable kernel found (/boot/vmlinuz-K with /lib/modules/K): is /boot "
            "mounted inside the guest root?"
        )
    if needs_lvm is not None:
        _refuse_without_lvm(guest.fs, guest.info, needs_lvm)
        guest.needs_lvm = needs_lvm
    results = [_one_kernel(guest, kernel, dry_run=dry_run, force=force) for kernel in kernels]
    builds = any(r.action in _BUILDS for r in results)
    report = InitramfsReport(
        outcome=_outcome(results, dry_run),
        dry_run=dry_run,
        generator=str(guest.info.kind),
        arch=guest.arch,
        modules_policy=guest.policy,
        kernels=tuple(results),
        notes=guest.override.notes if builds else (),
        lvm=lvm_note(guest.info.kind, needs_lvm, dry_run=dry_run)
        if builds and needs_lvm is not None
        else None,
    )
    failed = [result for result in results if not result.ok]
    if failed:
        first = failed[0]
        names = ", ".join(result.kernel for result in failed)
        raise InitramfsError(
            f"initramfs rebuild failed for kernel {names}: {first.reason} "
            "(its image in place was left as it was)",
            kernel=first.kernel,
            output_tail=first.output_tail,
            report=report,
        )
    return report


__all__ = [
    "BACKUP_SUFFIX",
    "LVM_BINARIES",
    "VIRTIO_BLOCK_DRIVERS",
    "VIRTIO_BOOT_MODULES",
    "ConfigOverride",
    "Generator",
    "GeneratorInfo",
    "GuestKernel",
    "InitramfsError",
    "InitramfsRefused",
    "InitramfsReport",
    "KernelResult",
    "builtin_modules",
    "detect_generator",
    "find_kernels",
    "initramfs_modules",
    "normalise_module",
    "parse_initramfs_files",
    "parse_initramfs_listing",
    "regenerate_initramfs",
]
