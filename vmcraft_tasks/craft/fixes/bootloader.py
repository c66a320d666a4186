"""Rewrite device names on the boot path (kernel command lines, resume, crypttab) to UUIDs.

Besides /etc/fstab, a VMware guest names its disks in the kernel command line
(root=/dev/sda1, resume=/dev/sda5), in initramfs-tools' resume setting and in
/etc/crypttab. On KVM with virtio those disks are /dev/vdX: the kernel waits forever
for its root, resume gives up after a timeout, and an encrypted volume is never
unlocked. Each such name becomes the UUID of what it names (the filesystem, the swap
area, the LUKS container), which moves with the data.

As with fstab, a wrong UUID is worse than a stale name, so a name is rewritten only
when the partition and what it holds are certain; everything else is left as it is
and reported. Only the device names change: every other byte of a file is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from vmcraft_tasks.craft.fixes.fstab import (
    Unresolved,
    is_hardware_name,
    resolve_device,
    volume_label,
)
from vmcraft_tasks.craft.fixes.model import Change, RewriteError
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import VolumeTable

# What a device name must hold: "root" is a filesystem that must also be the root found
# by inspection; "filesystem" any mountable filesystem.
Want = Literal["root", "filesystem", "swap", "luks"]
# A rewriter's result: the new text, its changes, and the names it left as they were.
Rewritten = tuple[str, list[Change], list[Unresolved]]
LineRewrite = Callable[[str], tuple[str, list[str], list[Unresolved]]]

GRUBENV_SIGNATURE = "# GRUB Environment Block\n"

_WANTED_TYPE = {"swap": "swap", "luks": "crypto_LUKS"}
# blkid types that are containers or swap, never a filesystem the kernel can mount.
_NOT_FILESYSTEMS = frozenset(
    {
        "swap",
        "crypto_LUKS",
        "LVM2_member",
        "linux_raid_member",
        "zfs_member",
        "bcache",
        "drbd",
        "ceph",
    }
)
_WANT_WORDS = {
    "root": "a filesystem",
    "filesystem": "a filesystem",
    "swap": "swap",
    "luks": "a LUKS container",
}

# One whole root=/resume= argument naming a /dev path. The lookarounds accept quotes
# around it (GRUB_CMDLINE_LINUX="...") and grub script's `;`, and stop a longer word
# such as noresume= or a name continued by $var from matching a prefix.
_DEVICE_ARG = re.compile(r"""(?<![^\s"'])(root|resume)=(/dev/[^\s"'\\;$]+)(?=[\s"'\\;]|$)""")
_RESUME_OFFSET_ARG = re.compile(r"""(?<![^\s"'])resume_offset=[^\s"']""")

# grub.cfg: kernel arguments follow the kernel path; `set root=` is a GRUB device name.
_GRUB_KERNEL = re.compile(r"^\s*(?:linux|linux16|linuxefi|kernel)\s+\S+(?P<args>.*)$")
_GRUB_SET = re.compile(r"^\s*set\s+(?!root=)[A-Za-z_][A-Za-z0-9_]*=(?P<args>.*)$")
_BLS_OPTIONS = re.compile(r"^\s*options\s(?P<args>.*)$")
_GRUBENV_KERNELOPTS = re.compile(r"^kernelopts=(?P<args>.*)$")
_WHOLE_LINE = re.compile(r"^(?P<args>.*)$")
_DEFAULT_GRUB_CMDLINE = re.compile(
    r"^[ \t]*(?:export[ \t]+)?(GRUB_CMDLINE_LINUX(?:_DEFAULT)?)=", re.MULTILINE
)
_SHELL_WORD_END = frozenset(" \t\n;&|<>()")

_RESUME_SETTING = re.compile(
    r"""^(?P<head>\s*(?:export\s+)?RESUME=)(?P<q>["']?)(?P<dev>/dev/[^\s"'#;]+)(?P=q)(?=[\s;#]|$)"""
)
_RESUME_OFFSET_SETTING = re.compile(r"""^\s*(?:export\s+)?RESUME_OFFSET=["']?\d""", re.MULTILINE)
# crypttab: name, then the device field; a comment line starts with "#".
_CRYPTTAB_LINE = re.compile(r"^(?P<head>\s*[^\s#]\S*\s+)(?P<dev>\S+)(?P<rest>.*)$")


def initramfs_copy_note(path: str) -> str:
    """The note for a changed file the initramfs keeps its own copy of."""
    return (
        f"{path} was rewritten but the initramfs holds its own copy: rebuild it "
        "(update-initramfs -u / dracut -f) so that copy names the device by UUID too"
    )


@dataclass(frozen=True)
class Resolution:
    """The UUID a device name maps to, and why (or, with no UUID, why not)."""

    uuid: str | None
    reason: str


def _holds(fstype: str | None, want: Want) -> bool:
    if fstype is None:
        return False
    if want in _WANTED_TYPE:
        return fstype == _WANTED_TYPE[want]
    return fstype not in _NOT_FILESYSTEMS


@dataclass(frozen=True)
class DeviceMap:
    """Maps the guest's names for partitions of THIS disk to the UUIDs of their content.

    The guest's first disk (sda, hda, xvda, nvme0n1) is this disk, as the fstab fix
    assumes; names of other disks, whole disks and unknown partitions are never mapped.
    Given the VM's `volumes` (and `filesystems`, `partitions`, `root_partition`
    numbered VM-wide), names of the VM's other disks are mapped by the guest's disk
    order too (/dev/sdb2: disk 2 partition 2); a disk the VM does not have never is.
    `root_partition` (where inspection found "/") is checked against every root=.
    """

    filesystems: Sequence[Filesystem]
    partitions: Sequence[Partition]
    root_partition: int | None = None
    volumes: VolumeTable | None = None

    def _label(self, number: int) -> str:
        return volume_label(number, self.volumes)

    def resolve(self, device: str, want: Want) -> Resolution:
        found = resolve_device(device, self.filesystems, self.partitions, self.volumes)
        number = found.partition
        if number is None:
            return Resolution(None, found.reason or f"cannot map {device}")
        uuid, problem = self._uuid_of(number, want)
        if uuid is None:
            return Resolution(None, problem or f"cannot map {device}")
        if want == "root" and self.root_partition not in (None, number):
            return Resolution(
                None,
                f"{device} is {self._label(number)} but the root filesystem was found on "
                f"{self._label(self.root_partition or 0)}: the guest's disk names cannot "
                "be trusted",
            )
        return Resolution(uuid, f"{device} is {self._label(number)}; its name changes on KVM")

    def _uuid_of(self, number: int, want: Want) -> tuple[str | None, str | None]:
        label = self._label(number)
        found = [fs for fs in self.filesystems if fs.partition == number]
        if len(found) != 1:
            return None, f"blkid found nothing on {label}"
        fs = found[0]
        if not _holds(fs.type, want):
            held = fs.type or "nothing blkid recognises"
            return None, f"{label} holds {held}, not {_WANT_WORDS[want]}"
        if not fs.uuid:
            return None, f"{label} has no UUID"
        sharing = sorted(
            f.partition for f in self.filesystems if (f.uuid or "").lower() == fs.uuid.lower()
        )
        if len(sharing) > 1:
            if self.volumes is None:
                listed = ", ".join(str(n) for n in sharing)
                return None, (
                    f"UUID {fs.uuid} is shared by partitions {listed} (cloned filesystems)"
                )
            listed = ", ".join(self._label(n) for n in sharing)
            return None, f"UUID {fs.uuid} is shared by {listed} (cloned filesystems)"
        return fs.uuid, None


def rewrite_kernel_args(args: str, devices: DeviceMap) -> tuple[str, list[str], list[Unresolved]]:
    """Rewrite root= and resume= hardware device names in one kernel command line.

    Returns the new arguments, why each rewritten argument changed, and the arguments
    left as they were with the reason. Only those arguments' device names change.
    """
    # With resume_offset= the hibernation image is in a swap FILE, so resume= names
    # the filesystem holding that file, not a swap partition.
    resume_want: Want = "filesystem" if _RESUME_OFFSET_ARG.search(args) else "swap"
    reasons: list[str] = []
    left: list[Unresolved] = []

    def replace(match: re.Match[str]) -> str:
        arg, key, device = match.group(0), match.group(1), match.group(2)
        if not is_hardware_name(device):
            return arg
        found = devices.resolve(device, "root" if key == "root" else resume_want)
        if found.uuid is None:
            left.append(Unresolved(arg, found.reason))
            return arg
        reasons.append(f"{arg}: {found.reason}")
        return f"{key}=UUID={found.uuid}"

    return _DEVICE_ARG.sub(replace, args), reasons, left


def _lines(text: str) -> list[str]:
    # Only "\n" ends a line for these files; str.splitlines would also split at \f, \v
    # and U+2028, and a kernel line cut there would no longer look like one.
    return re.findall(r"[^\n]*\n|[^\n]+", text)


def _by_line(text: str, rewrite_line: LineRewrite) -> Rewritten:
    out: list[str] = []
    changes: list[Change] = []
    left: list[Unresolved] = []
    for line in _lines(text):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        new_body, reasons, unresolved = rewrite_line(body)
        left.extend(unresolved)
        if new_body != body:
            changes.append(Change(body, new_body, "; ".join(reasons)))
        out.append(new_body + ending)
    return "".join(out), changes, left


def _args_in(patterns: Sequence[re.Pattern[str]], devices: DeviceMap) -> LineRewrite:
    """A line rewrite for the kernel arguments in the `args` group of the first match."""

    def rewrite_line(body: str) -> tuple[str, list[str], list[Unresolved]]:
        for pattern in patterns:
            if match := pattern.match(body):
                start, end = match.span("args")
                args, reasons, left = rewrite_kernel_args(body[start:end], devices)
                return body[:start] + args + body[end:], reasons, left
        return body, [], []

    return rewrite_line


def rewrite_kernel_cmdline(text: str, devices: DeviceMap) -> Rewritten:
    """A file that is nothing but kernel arguments (/etc/kernel/cmdline)."""
    return _by_line(text, _args_in([_WHOLE_LINE], devices))


def rewrite_grub_cfg(text: str, devices: DeviceMap) -> Rewritten:
    """grub.cfg (or GRUB legacy's menu.lst): the kernel lines and `set` variables.

    `search` and `set root=` lines name GRUB devices, not kernel arguments, and are
    never touched; nor is anything else of the generated script.
    """
    return _by_line(text, _args_in([_GRUB_KERNEL, _GRUB_SET], devices))


def rewrite_bls_entry(text: str, devices: DeviceMap) -> Rewritten:
    """A Boot Loader Specification entry (/boot/loader/entries/*.conf): its `options`."""
    return _by_line(text, _args_in([_BLS_OPTIONS], devices))


def rewrite_grubenv(text: str, devices: DeviceMap) -> Rewritten:
    """/boot/grub2/grubenv's kernelopts= (RHEL 8), keeping the block's size.

    GRUB rewrites the environment block in place, so it must stay the same size: the
    longer UUID names take their room from the "#" padding at the end.
    """
    if not text.startswith(GRUBENV_SIGNATURE):
        raise RewriteError("not a GRUB environment block (no signature line)")
    new_text, changes, left = _by_line(text, _args_in([_GRUBENV_KERNELOPTS], devices))
    grown = len(new_text) - len(text)
    if grown == 0:
        return new_text, changes, left
    body = new_text.rstrip("#")
    padding = len(new_text) - len(body)
    if padding < grown:
        raise RewriteError(
            f"the environment block has {padding} bytes of padding left, "
            f"the UUID names need {grown}"
        )
    return body + "#" * (padding - grown), changes, left


def _quoted_end(text: str, start: int, name: str) -> int:
    """The index of the quote closing the one at `start`."""
    quote = text[start]
    i = start + 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
        elif text[i] == quote:
            return i
        else:
            i += 1
    raise RewriteError(f"the value of {name} has an unterminated {quote} quote")


def _shell_word_end(text: str, start: int, name: str) -> int:
    """Where the shell word starting at `start` ends (quotes and escapes followed)."""
    i = start
    while i < len(text) and text[i] not in _SHELL_WORD_END:
        if text[i] == "\\":
            i += 2
        elif text[i] in "\"'":
            i = _quoted_end(text, i, name) + 1
        else:
            i += 1
    return min(i, len(text))


def _line_end(text: str, index: int) -> int:
    end = text.find("\n", index)
    return len(text) if end < 0 else end


def rewrite_default_grub(text: str, devices: DeviceMap) -> Rewritten:
    """/etc/default/grub (a shell file): GRUB_CMDLINE_LINUX and _DEFAULT.

    The value is followed through shell quoting, so a quoted value spanning lines is
    rewritten whole; an assignment inside another's quoted value is not one.
    """
    pieces: list[str] = []
    changes: list[Change] = []
    left: list[Unresolved] = []
    pos = 0
    for match in _DEFAULT_GRUB_CMDLINE.finditer(text):
        if match.start() < pos:
            continue
        start = match.end()
        end = _shell_word_end(text, start, match.group(1))
        args, reasons, unresolved = rewrite_kernel_args(text[start:end], devices)
        left.extend(unresolved)
        if reasons:
            line_end = _line_end(text, end)
            before = text[match.start() : line_end]
            after = text[match.start() : start] + args + text[end:line_end]
            changes.append(Change(before, after, "; ".join(reasons)))
        pieces += [text[pos:start], args]
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces), changes, left


# Where each kind of bootloader file keeps kernel command lines (the rewriters' patterns).
CmdlineKind = Literal["grub-cfg", "grub-default", "bls-entry", "grubenv", "kernel-cmdline"]
_CMDLINE_LINES: dict[str, tuple[re.Pattern[str], ...]] = {
    "grub-cfg": (_GRUB_KERNEL, _GRUB_SET),
    "bls-entry": (_BLS_OPTIONS,),
    "grubenv": (_GRUBENV_KERNELOPTS,),
    "kernel-cmdline": (_WHOLE_LINE,),
}


def kernel_cmdlines(text: str, kind: CmdlineKind) -> list[str]:
    """The kernel command lines in a bootloader file of `kind`, found exactly where the
    rewriters above look: grub.cfg's kernel lines and `set` variables, a BLS entry's
    `options`, grubenv's kernelopts=, /etc/default/grub's GRUB_CMDLINE_LINUX(_DEFAULT)
    values (quotes kept, a value spanning lines whole), every line of
    /etc/kernel/cmdline (pure)."""
    if kind == "grub-default":
        found = []
        pos = 0
        for setting in _DEFAULT_GRUB_CMDLINE.finditer(text):
            if setting.start() < pos:
                continue
            start = setting.end()
            try:
                end = _shell_word_end(text, start, setting.group(1))
            except RewriteError:
                end = _line_end(text, start)  # an unterminated quote: the rest of its line
            found.append(text[start:end])
            pos = end
        return found
    patterns = _CMDLINE_LINES[kind]
    found = []
    for line in _lines(text):
        body = line.rstrip("\r\n")
        for pattern in patterns:
            if match := pattern.match(body):
                found.append(match.group("args"))
                break
    return found


def _device_field(pattern: re.Pattern[str], want: Want, devices: DeviceMap) -> LineRewrite:
    """A line rewrite for the device name in the `dev` group of `pattern`."""

    def rewrite_line(body: str) -> tuple[str, list[str], list[Unresolved]]:
        match = pattern.match(body)
        if match is None or not is_hardware_name(match.group("dev")):
            return body, [], []
        found = devices.resolve(match.group("dev"), want)
        if found.uuid is None:
            return body, [], [Unresolved(body, found.reason)]
        start, end = match.span("dev")
        return body[:start] + f"UUID={found.uuid}" + body[end:], [found.reason], []

    return rewrite_line


def rewrite_initramfs_resume(text: str, devices: DeviceMap) -> Rewritten:
    """/etc/initramfs-tools/conf.d/resume: RESUME=/dev/sdXN becomes RESUME=UUID=<swap>."""
    # RESUME_OFFSET means a swap file: RESUME then names the filesystem holding it.
    want: Want = "filesystem" if _RESUME_OFFSET_SETTING.search(text) else "swap"
    return _by_line(text, _device_field(_RESUME_SETTING, want, devices))


def rewrite_crypttab(text: str, devices: DeviceMap) -> Rewritten:
    """/etc/crypttab: the device field becomes UUID=<LUKS container>; all else is kept."""
    return _by_line(text, _device_field(_CRYPTTAB_LINE, "luks", devices))
