"""LVM names on the guest's kernel command lines, checked against the VM's LVs.

A guest on LVM names its root (and resume) LV on the kernel command line, and dracut
guests also say which LVs the initramfs activates: `root=/dev/mapper/rl-root`,
`resume=/dev/rl/swap`, `rd.lvm.lv=rl/root`, `rd.lvm.vg=rl`. These names are stable
across the move to KVM (the fixes keep them), but only if the VM still has those LVs:
a disk left out of the manifest, an LV that cannot be activated or a stale
`rd.lvm.lv=` makes dracut wait for a device that never appears and drop to its
emergency shell. So every such name is checked against the LVs the VM really has.

`check_lvm_boot` is pure (command lines and LV facts in, findings out); one small
reader, `read_boot_config`, collects the command lines from the same files the
kernel command-line fix edits, with the same parsing (`bootloader.kernel_cmdlines`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.fixes.bootloader import CmdlineKind, kernel_cmdlines
from vmcraft_tasks.craft.fixes.distros import MAX_DIR_ENTRIES, Fixer
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.linux import TEXT_FILE_CAP
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.volumes import VolumeTable, split_mapper_name

# /dev/<dir>/<name> names that are not /dev/<VG>/<LV>.
_NOT_VG_DIRS = frozenset(
    {
        "block",
        "bus",
        "cciss",
        "char",
        "disk",
        "dri",
        "fd",
        "i2o",
        "ida",
        "input",
        "mapper",
        "md",
        "net",
        "pts",
        "rd",
        "shm",
        "snd",
        "vfio",
        "zvol",
    }
)
_DEV_VG_LV = re.compile(r"^/dev/([^/]+)/([^/]+)$")
# One kernel argument: quotes, grub script's `;` and backslashes are not part of it.
_ARG = re.compile(r"""[^\s"';\\]+""")
_LV_ARGS = ("rd.lvm.lv", "rd_LVM_LV")
_VG_ARGS = ("rd.lvm.vg", "rd_LVM_VG")
# Mounts the initramfs itself needs: the root, and /usr when it is separate.
INITRAMFS_MOUNTS = ("/", "/usr")


class LVFacts(Protocol):
    """What the check needs of one LV of the VM (`craft.guestvm.LVInfo` is one)."""

    @property
    def vg(self) -> str: ...

    @property
    def lv(self) -> str: ...

    @property
    def reason(self) -> str | None: ...  # why it cannot be used; None: it can


@dataclass(frozen=True)
class LVState:
    """Plain LV facts, for callers that have no `LVInfo`."""

    vg: str
    lv: str
    reason: str | None = None


@dataclass(frozen=True)
class KernelCmdline:
    """One kernel command line and the guest file it is in."""

    path: str
    args: str


@dataclass(frozen=True)
class LvmBootFinding:
    """An LVM name on a kernel command line that is wrong for this VM (or worth a note)."""

    path: str  # the guest file
    argument: str  # the argument as written: rd.lvm.lv=rl/nosuch
    problem: str
    fatal: bool = True  # False: a note, the guest still boots

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.path}: {self.argument}: {self.problem}"


@dataclass(frozen=True)
class BootConfig:
    """What `read_boot_config` found in a guest tree."""

    cmdlines: tuple[KernelCmdline, ...] = ()
    dm_names: frozenset[str] = frozenset()  # /dev/mapper names crypttab creates
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- pure


def kernel_args(args: str) -> list[str]:
    """The arguments of one command line; `$var` references are not arguments (pure)."""
    return [arg for arg in _ARG.findall(args) if "$" not in arg]


def lv_of_device(device: str, dm_names: Collection[str] = ()) -> tuple[str, str] | None:
    """(VG, LV) of `/dev/mapper/VG-LV` or `/dev/VG/LV`; None for other devices and for
    the device-mapper names in `dm_names` (LUKS mappings of crypttab) (pure)."""
    if device.startswith("/dev/mapper/"):
        name = device[len("/dev/mapper/") :]
        return None if name in dm_names else split_mapper_name(name)
    match = _DEV_VG_LV.match(device)
    if match is None or match.group(1) in _NOT_VG_DIRS:
        return None
    return match.group(1), match.group(2)


def _lv_problem(vg: str, lv: str, lvs: Sequence[LVFacts]) -> str | None:
    """Why the VM has no usable LV `vg`/`lv`; None when it has exactly one."""
    found = [x for x in lvs if x.vg == vg and x.lv == lv]
    if len(found) > 1:
        return (
            f"{len(found)} VGs named {vg} in the VM have an LV {lv}: LVM in the guest "
            "cannot tell them apart"
        )
    if found:
        reason = found[0].reason
        return None if reason is None else f"LV {vg}/{lv} cannot be used: {reason}"
    in_vg = sorted({x.lv for x in lvs if x.vg == vg})
    if in_vg:
        return f"the VM's VG {vg} has no LV {lv} (its LVs: {', '.join(in_vg)})"
    return _no_vg(vg, lvs)


def _no_vg(vg: str, lvs: Sequence[LVFacts]) -> str:
    vgs = sorted({x.vg for x in lvs})
    if vgs:
        return f"the VM has no VG {vg} (its VGs: {', '.join(vgs)})"
    return f"the VM has no LVM at all: no VG {vg} on any of its disks (a disk left out?)"


@dataclass
class _Line:
    """The LVM-relevant arguments of one command line."""

    root: str | None = None  # the root= argument as written
    root_lv: tuple[str, str] | None = None
    resume: str | None = None  # a resume= argument naming an LV
    resume_lv: tuple[str, str] | None = None
    lvs: list[tuple[str, str]] = field(default_factory=list)  # rd.lvm.lv=
    vgs: list[str] = field(default_factory=list)  # rd.lvm.vg=
    lvm_off: str | None = None  # rd.lvm=0 / rd_NO_LVM as written


def check_lvm_boot(
    cmdlines: Iterable[KernelCmdline],
    lvs: Sequence[LVFacts],
    *,
    root_lv: tuple[str, str] | None = None,
    dracut: bool = True,
    dm_names: Collection[str] = (),
) -> list[LvmBootFinding]:
    """Every LVM name of the command lines that the VM cannot satisfy (pure).

    `lvs` are the VM's LVs (every VG found on its disks); `root_lv` is the LV
    inspection found the root on (for root=UUID=...), `dracut` whether the guest's
    initramfs is dracut's (initramfs-tools ignores rd.lvm.*, and gives up waiting for a
    resume device), `dm_names` device-mapper names the guest makes that are not LVs.

    Fatal: root=/resume= naming an LV the VM lacks (or one that cannot be used, or one
    two VGs share); on dracut also rd.lvm.lv=/rd.lvm.vg= naming what the VM lacks,
    rd.lvm=0 with the root on LVM, and rd.lvm.* that leave the root LV inactive. A
    note: the root on LVM with no rd.lvm.* at all (dracut then activates every VG).
    """
    found: list[LvmBootFinding] = []

    def add(path: str, argument: str, problem: str, fatal: bool = True) -> None:
        finding = LvmBootFinding(path, argument, problem, fatal)
        if finding not in found:
            found.append(finding)

    for cmdline in cmdlines:
        line = _Line()
        for arg in kernel_args(cmdline.args):
            problem = _check_arg(arg, line, lvs, root_lv=root_lv, dracut=dracut, dm_names=dm_names)
            if problem is not None:
                # Only a missing root stops every guest; initramfs-tools ignores
                # rd.lvm.* and boots on without its resume device.
                fatal = arg.startswith("root=") or dracut
                add(cmdline.path, arg, problem, fatal)
        if dracut:
            _coverage(cmdline.path, line, add)
    return found


def _check_arg(
    arg: str,
    line: _Line,
    lvs: Sequence[LVFacts],
    *,
    root_lv: tuple[str, str] | None,
    dracut: bool,
    dm_names: Collection[str],
) -> str | None:
    """Note `arg` in `line`; what is wrong with it for this VM, if anything."""
    key, sep, value = arg.partition("=")
    if arg == "rd_NO_LVM" or (key == "rd.lvm" and value == "0"):
        line.lvm_off = arg
    if not sep or not value:
        return None
    if key in ("root", "resume"):
        named = lv_of_device(value, dm_names)
        if key == "root":
            line.root = arg
            # root=UUID=... is the root inspection found; another /dev name is no LV.
            line.root_lv = named if value.startswith("/dev/") else root_lv
        if named is None:
            return None
        problem = _lv_problem(*named, lvs)
        if key == "resume":
            line.resume, line.resume_lv = arg, named
        if problem is None:
            return None
        # Said once: an LV the VM lacks is not also one dracut does not activate.
        line.root_lv = None if key == "root" else line.root_lv
        line.resume_lv = None if key == "resume" else line.resume_lv
        if key == "root":
            return f"{problem}: the kernel never finds its root filesystem"
        if not dracut:
            return f"{problem} (initramfs-tools gives up waiting for it and boots on)"
        return f"{problem}: dracut waits for the resume device and drops to its emergency shell"
    if key in _LV_ARGS:
        vg, slash, lv = value.partition("/")
        if slash and vg and lv:
            line.lvs.append((vg, lv))
            problem = _lv_problem(vg, lv, lvs)
            then = f"dracut waits for /dev/{vg}/{lv} and drops to its emergency shell"
        else:
            line.vgs.append(value)  # lvm takes a bare VG name for all of that VG
            problem = None if any(x.vg == value for x in lvs) else _no_vg(value, lvs)
            then = "dracut is told to activate a VG the VM does not have"
    elif key in _VG_ARGS:
        line.vgs.append(value)
        problem = None if any(x.vg == value for x in lvs) else _no_vg(value, lvs)
        then = "dracut is told to activate a VG the VM does not have"
    else:
        return None
    if problem is None:
        return None
    if not dracut:
        return f"{problem} (initramfs-tools ignores rd.lvm.*: harmless here)"
    return f"{problem}: {then}"


def _coverage(path: str, line: _Line, add: Callable[[str, str, str, bool], None]) -> None:
    """Whether dracut's rd.lvm.* on this command line activate the root (and resume) LV."""
    if line.resume is not None and line.resume_lv is not None and (line.lvs or line.vgs):
        vg, lv = line.resume_lv
        if (vg, lv) not in line.lvs and vg not in line.vgs:
            add(
                path,
                line.resume,
                f"dracut activates only what rd.lvm.lv=/rd.lvm.vg= name ({_listed_lvs(line)}): "
                f"the resume LV {vg}/{lv} is not among them, so dracut waits for it and "
                "drops to its emergency shell",
                True,
            )
    if line.root is None or line.root_lv is None:
        return
    vg, lv = line.root_lv
    if line.lvm_off is not None:
        add(
            path,
            line.lvm_off,
            f"LVM is switched off in the initramfs, but the root is LV {vg}/{lv}",
            True,
        )
        return
    if not line.lvs and not line.vgs:
        add(
            path,
            line.root,
            f"the root is LV {vg}/{lv} and no rd.lvm.lv= names it: dracut activates "
            f"every VG it finds (rd.lvm.lv={vg}/{lv} would name it)",
            False,
        )
        return
    if (vg, lv) in line.lvs or vg in line.vgs:
        return
    add(
        path,
        line.root,
        f"dracut activates only what rd.lvm.lv=/rd.lvm.vg= name ({_listed_lvs(line)}): the root LV "
        f"{vg}/{lv} is not among them, so the root never appears",
        True,
    )


def _listed_lvs(line: _Line) -> str:
    return ", ".join([f"{vg}/{lv}" for vg, lv in line.lvs] + [f"VG {vg}" for vg in line.vgs])


def lv_mounts(
    os_info: OSInfo, volumes: VolumeTable | None, lvs: Sequence[LVFacts] | None = None
) -> dict[str, tuple[str, str]]:
    """{mountpoint: (VG, LV)} for "/" and "/usr" when they are on an LV (pure).

    From the VM's `volumes` when given (the root volume, the fstab's resolved /usr);
    otherwise from the fstab's own LVM names, when they name one of `lvs`.
    """
    found: dict[str, tuple[str, str]] = {}
    entries = {e.entry.mountpoint: e for e in os_info.fstab}
    for mountpoint in INITRAMFS_MOUNTS:
        number = os_info.root_partition if mountpoint == "/" else None
        entry = entries.get(mountpoint)
        if number is None and entry is not None:
            number = entry.resolved_partition
        volume = volumes.get(number) if volumes is not None and number is not None else None
        if volume is not None:
            if volume.vg is not None and volume.lv is not None:
                found[mountpoint] = (volume.vg, volume.lv)
            continue
        named = lv_of_device(entry.entry.spec) if entry is not None else None
        if named is not None and lvs is not None and any((x.vg, x.lv) == named for x in lvs):
            found[mountpoint] = named
    return found


# --------------------------------------------------------------------------- reader


def _read(fs: GuestFS, path: str, notes: list[str]) -> str | None:
    """The guest file's text; None when there is no such file (or, with a note, when
    it cannot be read)."""
    try:
        if not fs.is_file(path):
            return None
        return fs.read_file(path, max_size=TEXT_FILE_CAP).decode("utf-8", errors="replace")
    except GuestPathError as exc:
        notes.append(f"{path}: not examined for kernel command lines: {exc.reason}")
        return None


def _listed(fs: GuestFS, directory: str, suffix: str, notes: list[str]) -> list[str]:
    if not fs.is_dir(directory):
        return []
    try:
        entries = fs.ls(directory, limit=MAX_DIR_ENTRIES)
    except GuestPathError as exc:
        notes.append(f"{directory}: not examined for kernel command lines: {exc.reason}")
        return []
    return [f"{directory.rstrip('/')}/{e}" for e in entries if e.endswith(suffix)]


def _cmdline_files(fs: GuestFS, notes: list[str]) -> list[tuple[str, CmdlineKind]]:
    """The files the kernel command-line fix edits (`Fixer`'s paths), with their kind."""
    files: list[tuple[str, CmdlineKind]] = [(p, "grub-cfg") for p in Fixer.grub_cfg_paths]
    if fs.is_dir(Fixer.efi_dir):
        for vendor in _listed(fs, Fixer.efi_dir, "", notes):
            files += [(f"{vendor}/{name}", "grub-cfg") for name in Fixer.efi_grub_names]
    files.append((Fixer.default_grub_path, "grub-default"))
    files += [(p, "grub-default") for p in _listed(fs, Fixer.default_grub_dir, ".cfg", notes)]
    for directory in Fixer.bls_entries_dirs:
        files += [(p, "bls-entry") for p in _listed(fs, directory, ".conf", notes)]
    files.append((Fixer.grubenv_path, "grubenv"))
    files.append((Fixer.kernel_cmdline_path, "kernel-cmdline"))
    return files


def crypttab_names(text: str) -> frozenset[str]:
    """The /dev/mapper names /etc/crypttab creates (its first field) (pure)."""
    names = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            names.add(fields[0])
    return frozenset(names)


def read_boot_config(fs: GuestFS) -> BootConfig:
    """Every kernel command line of the guest tree `fs` (its /boot mounted inside), and
    the device-mapper names its crypttab makes."""
    notes: list[str] = []
    cmdlines: list[KernelCmdline] = []
    for path, kind in _cmdline_files(fs, notes):
        if (text := _read(fs, path, notes)) is not None:
            cmdlines += [KernelCmdline(path, args) for args in kernel_cmdlines(text, kind)]
    crypttab = _read(fs, Fixer.crypttab_path, notes)
    names = crypttab_names(crypttab) if crypttab is not None else frozenset()
    return BootConfig(tuple(cmdlines), names, tuple(notes))
