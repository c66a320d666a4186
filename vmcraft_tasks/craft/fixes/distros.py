"""Per-OS offline fixers for a converted guest, and `apply_fixes` to run them.

Like cloud-init's distro classes: a family is a class, a distribution inherits from
its family, and the guest paths a fix touches are class attributes a subclass can
override. Each fix step reads a guest file through GuestFS, runs a pure rewriter from
this package and writes the result back atomically, so the guest can never redirect a
write to the host. A dry run does all of that except the writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.fixes.bootloader import (
    DeviceMap,
    Rewritten,
    initramfs_copy_note,
    rewrite_bls_entry,
    rewrite_crypttab,
    rewrite_default_grub,
    rewrite_grub_cfg,
    rewrite_grubenv,
    rewrite_initramfs_resume,
    rewrite_kernel_cmdline,
)
from vmcraft_tasks.craft.fixes.fstab import Unresolved, rewrite_fstab
from vmcraft_tasks.craft.fixes.initramfs import (
    REGENERATE_NOTE,
    ensure_initramfs_modules,
    render_dracut_virtio_conf,
)
from vmcraft_tasks.craft.fixes.model import Change, FixRecord, FixReport, FixSkip, RewriteError
from vmcraft_tasks.craft.fixes.network import (
    rewrite_ifcfg,
    rewrite_ifupdown,
    rewrite_netplan,
    rewrite_nm_keyfile,
    rewrite_udev_net_rules,
)
from vmcraft_tasks.craft.fixes.services import (
    is_enablement_dir,
    is_vmware_sysv_link,
    is_vmware_unit_link,
)
from vmcraft_tasks.craft.guestpath import GuestFS, TooManyEntries
from vmcraft_tasks.craft.inspect.linux import TEXT_FILE_CAP
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import VolumeTable

Rewriter = Callable[[str], tuple[str, list[Change]]]
BootRewriter = Callable[[str, DeviceMap], Rewritten]

NETWORK_FIXES = frozenset({"ifcfg", "ifupdown", "netplan", "nm-keyfile", "udev-net-rules"})
NETWORK_NOTE = (
    "MAC-address pinning was removed: on KVM the NIC may also get a new name "
    "(e.g. enp1s0 instead of ens192); configs that name the interface must match it"
)
_SELINUX_MODE = re.compile(r"^\s*SELINUX\s*=\s*(enforcing|permissive)\s*$", re.MULTILINE)

# Bounds on the fixes' walks of guest directories: a guest can hold a million ifcfg
# files, and each file looked at becomes a record holding its text. Real guests have
# a few dozen entries in these directories. A directory with more than
# MAX_DIR_ENTRIES entries is skipped whole (only a bounded part of it is ever read,
# and which part would be arbitrary); once a budget of one `apply_fixes` run is spent
# (entries listed, files read by the walks, characters of text those files brought
# in), the rest is skipped. Either way a FixSkip says so: never a crash, never a
# silent cut.
MAX_DIR_ENTRIES = 4096
MAX_WALK_ENTRIES = 16384
MAX_WALK_FILES = 512
MAX_WALK_TEXT = 32 * 1024 * 1024


@dataclass
class WalkBudget:
    """What the directory walks of one `apply_fixes` run may still use.

    The defaults are read when the budget is made, so tests can lower the limits.
    """

    entries: int = field(default_factory=lambda: MAX_WALK_ENTRIES)
    files: int = field(default_factory=lambda: MAX_WALK_FILES)
    text: int = field(default_factory=lambda: MAX_WALK_TEXT)


@dataclass
class FixContext:
    """The state of one `apply_fixes` run that the steps share and add to."""

    fs: GuestFS
    os_info: OSInfo
    filesystems: Sequence[Filesystem]
    partitions: Sequence[Partition]
    dry_run: bool
    # The VM's volumes when `filesystems`/`partitions` are numbered VM-wide (several
    # disks, LVs): device names of every disk are then mapped, not only the boot disk's.
    volumes: VolumeTable | None = None
    applied: list[FixRecord] = field(default_factory=list)
    skipped: list[FixSkip] = field(default_factory=list)
    failed: list[FixSkip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # guest paths of new files
    # Guest targets already handled: two links to one file must not edit it twice.
    done: set[str] = field(default_factory=set)
    walk: WalkBudget = field(default_factory=WalkBudget)

    def skip(self, name: str, path: str, reason: str) -> None:
        self.skipped.append(FixSkip(name, path, reason))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _target(self, name: str, path: str, *, required: bool) -> str | None:
        """The guest path of the regular file behind `path` (links resolved in the guest).

        None, with a skip when that matters, when there is no such file.
        """
        fs = self.fs
        if fs.exists(path):
            target = fs.realpath(path)
            if fs.is_file(target):
                return target
            self.skip(name, path, "not a regular file")
            return None
        if fs.is_symlink(path):
            link = fs.readlink(path)
            self.skip(name, path, f"symlink to {link}, which does not resolve inside the guest")
        elif required:
            self.skip(name, path, "not present")
        return None

    def _commit(
        self,
        name: str,
        path: str,
        *,
        target: str,
        before: str | None,
        after: str,
        changes: list[Change],
    ) -> FixRecord | None:
        changed = after != before
        note = None if target == path else f"{path} resolves to {target} in the guest: edited that"
        if changed and not self.dry_run:
            try:
                if before is None:
                    self.fs.makedirs(target.rsplit("/", 1)[0] or "/")
                self.fs.write_file(target, after.encode("utf-8", errors="surrogateescape"))
            except GuestPathError as exc:
                self.failed.append(FixSkip(name, path, exc.reason))
                return None
        if changed and before is None:
            self.created.append(target)
        record = FixRecord(name, path, before, after, changed, note, tuple(changes))
        self.applied.append(record)
        return record

    def _rewrite(
        self, name: str, path: str, rewrite: Rewriter, text: str
    ) -> tuple[str, list[Change]] | None:
        try:
            return rewrite(text)
        except RewriteError as exc:
            self.skip(name, path, exc.reason)
            return None

    def edit_text(
        self,
        name: str,
        path: str,
        rewrite: Rewriter,
        *,
        required: bool = False,
        create: bool = False,
    ) -> FixRecord | None:
        """Rewrite the guest text file `path` with `rewrite` (a symlink: its guest target).

        An absent file is skipped silently unless `required`, or, with `create`, made
        from `rewrite("")` (missing parent directories included). Bytes that are not
        UTF-8 pass through unchanged (surrogateescape), so untouched lines stay
        byte-exact.
        """
        fs = self.fs
        if create and not fs.exists(path) and not fs.is_symlink(path):
            if path in self.done:
                return None
            self.done.add(path)
            result = self._rewrite(name, path, rewrite, "")
            if result is None:
                return None
            return self._commit(
                name, path, target=path, before=None, after=result[0], changes=result[1]
            )
        target = self._target(name, path, required=required)
        if target is None or target in self.done:
            return None
        self.done.add(target)
        try:
            text = fs.read_file(target, max_size=TEXT_FILE_CAP).decode(
                "utf-8", errors="surrogateescape"
            )
        except GuestPathError as exc:
            self.skip(name, path, f"cannot read: {exc.reason}")
            return None
        result = self._rewrite(name, path, rewrite, text)
        if result is None:
            return None
        return self._commit(
            name, path, target=target, before=text, after=result[0], changes=result[1]
        )

    def ensure_text(self, name: str, path: str, content: str) -> FixRecord | None:
        """Make the guest file `path` hold exactly `content` (created if missing)."""
        return self.edit_text(name, path, lambda _old: (content, []), required=True, create=True)

    def remove_link(self, name: str, path: str, reason: str) -> FixRecord | None:
        """Remove the guest symlink `path` itself (its target is never touched)."""
        target = self.fs.readlink(path)
        if not self.dry_run:
            try:
                self.fs.remove(path)
            except GuestPathError as exc:
                self.failed.append(FixSkip(name, path, exc.reason))
                return None
        record = FixRecord(name, path, target, None, True, reason)
        self.applied.append(record)
        return record


FixStep = Callable[[FixContext], None]


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _budget_spent(left: int) -> str:
    return (
        f"{left} more files not examined: the fixes' budget ({MAX_WALK_FILES} files, "
        f"{MAX_WALK_TEXT} characters of text read by directory walks) is spent"
    )


class Fixer:
    """Fixes every Linux guest needs; families add their own steps and paths."""

    name: ClassVar[str] = "linux"
    distros: ClassVar[frozenset[str]] = frozenset()  # libguestfs distro names

    fstab_path: ClassVar[str] = "/etc/fstab"
    udev_net_rules_path: ClassVar[str] = "/etc/udev/rules.d/70-persistent-net.rules"
    systemd_system_dir: ClassVar[str] = "/etc/systemd/system"
    sysv_rc_dirs: ClassVar[tuple[str, ...]] = tuple(f"/etc/rc{level}.d" for level in "0123456S")
    nm_connections_dir: ClassVar[str] = "/etc/NetworkManager/system-connections"
    ifcfg_dir: ClassVar[str] = "/etc/sysconfig/network-scripts"
    interfaces_path: ClassVar[str] = "/etc/network/interfaces"
    interfaces_dir: ClassVar[str] = "/etc/network/interfaces.d"
    netplan_dir: ClassVar[str] = "/etc/netplan"
    dracut_conf_dir: ClassVar[str] = "/etc/dracut.conf.d"
    dracut_virtio_conf: ClassVar[str] = "90-vmcraft-virtio.conf"
    # Any of these means dracut is the guest's initramfs generator (or can be).
    dracut_markers: ClassVar[tuple[str, ...]] = (
        "/etc/dracut.conf",
        "/etc/dracut.conf.d",
        "/usr/lib/dracut",
    )
    initramfs_tools_dir: ClassVar[str] = "/etc/initramfs-tools"
    initramfs_generators: ClassVar[tuple[str, ...]] = ("dracut", "initramfs-tools")
    # Where kernel command lines live: GRUB 2 and GRUB legacy configs, the EFI system
    # partition's copies (/boot/efi/EFI/<vendor>/), GRUB's defaults, BLS entries
    # (grub2 and systemd-boot), RHEL 8's grubenv and kernel-install's cmdline.
    grub_cfg_paths: ClassVar[tuple[str, ...]] = (
        "/boot/grub/grub.cfg",
        "/boot/grub2/grub.cfg",
        "/boot/grub/menu.lst",
        "/boot/grub/grub.conf",
    )
    efi_dir: ClassVar[str] = "/boot/efi/EFI"
    efi_grub_names: ClassVar[tuple[str, ...]] = ("grub.cfg", "grub.conf")
    default_grub_path: ClassVar[str] = "/etc/default/grub"
    default_grub_dir: ClassVar[str] = "/etc/default/grub.d"
    bls_entries_dirs: ClassVar[tuple[str, ...]] = (
        "/boot/loader/entries",
        "/boot/efi/loader/entries",
        "/efi/loader/entries",
    )
    grubenv_path: ClassVar[str] = "/boot/grub2/grubenv"
    kernel_cmdline_path: ClassVar[str] = "/etc/kernel/cmdline"
    crypttab_path: ClassVar[str] = "/etc/crypttab"

    def steps(self) -> list[FixStep]:
        """The fix steps, in order; subclasses extend the list."""
        return [
            self.fix_fstab,
            self.fix_udev_net_rules,
            self.disable_vmware_tools,
            self.fix_kernel_cmdline,
            self.fix_resume,
            self.fix_crypttab,
        ]

    # -- storage ------------------------------------------------------------------

    def fix_fstab(self, ctx: FixContext) -> None:
        unresolved = []

        def rewrite(text: str) -> tuple[str, list[Change]]:
            new_text, changes, left = rewrite_fstab(
                text,
                ctx.filesystems,
                ctx.partitions,
                root_partition=ctx.os_info.root_partition,
                volumes=ctx.volumes,
            )
            unresolved.extend(left)
            return new_text, changes

        ctx.edit_text("fstab", self.fstab_path, rewrite, required=True)
        for entry in unresolved:
            ctx.skip("fstab", self.fstab_path, f"{entry.line.strip()}: {entry.reason}")

    # -- boot path ----------------------------------------------------------------

    @staticmethod
    def _boot_edit(
        ctx: FixContext, name: str, path: str, rewrite: BootRewriter
    ) -> FixRecord | None:
        devices = DeviceMap(
            ctx.filesystems,
            ctx.partitions,
            root_partition=ctx.os_info.root_partition,
            volumes=ctx.volumes,
        )
        unresolved: list[Unresolved] = []

        def run(text: str) -> tuple[str, list[Change]]:
            new_text, changes, left = rewrite(text, devices)
            unresolved.extend(left)
            return new_text, changes

        record = ctx.edit_text(name, path, run)
        # A generated grub.cfg repeats one argument in every entry: report it once.
        for entry in dict.fromkeys(unresolved):
            ctx.skip(name, path, f"{entry.line.strip()}: {entry.reason}")
        return record

    @staticmethod
    def _files_in(ctx: FixContext, directory: str, suffix: str) -> list[str]:
        name = "kernel-cmdline"
        files = [e for e in Fixer._list_dir(ctx, name, directory) if e.endswith(suffix)]
        # These files are read later, one record each: they count against the budget.
        kept = files[: max(ctx.walk.files, 0)]
        ctx.walk.files -= len(kept)
        if len(kept) < len(files):
            ctx.skip(name, directory, _budget_spent(len(files) - len(kept)))
        return [_join(directory, entry) for entry in kept]

    def _kernel_cmdline_files(self, ctx: FixContext) -> list[tuple[str, str, BootRewriter]]:
        files: list[tuple[str, str, BootRewriter]] = [
            ("grub-cfg", path, rewrite_grub_cfg) for path in self.grub_cfg_paths
        ]
        if ctx.fs.is_dir(self.efi_dir):
            for vendor in self._list_dir(ctx, "grub-cfg", self.efi_dir):
                for cfg in self.efi_grub_names:
                    path = _join(_join(self.efi_dir, vendor), cfg)
                    files.append(("grub-cfg", path, rewrite_grub_cfg))
        files.append(("grub-default", self.default_grub_path, rewrite_default_grub))
        for path in self._files_in(ctx, self.default_grub_dir, ".cfg"):
            files.append(("grub-default", path, rewrite_default_grub))
        for directory in self.bls_entries_dirs:
            for path in self._files_in(ctx, directory, ".conf"):
                files.append(("bls-entry", path, rewrite_bls_entry))
        files.append(("grubenv", self.grubenv_path, rewrite_grubenv))
        files.append(("kernel-cmdline", self.kernel_cmdline_path, rewrite_kernel_cmdline))
        return files

    def fix_kernel_cmdline(self, ctx: FixContext) -> None:
        for name, path, rewrite in self._kernel_cmdline_files(ctx):
            self._boot_edit(ctx, name, path, rewrite)

    def fix_resume(self, ctx: FixContext) -> None:
        # resume= on kernel command lines is fix_kernel_cmdline's; this is initramfs-tools'.
        path = _join(self.initramfs_tools_dir, "conf.d/resume")
        record = self._boot_edit(ctx, "initramfs-resume", path, rewrite_initramfs_resume)
        if record is not None and record.changed:
            ctx.note(initramfs_copy_note(path))

    def fix_crypttab(self, ctx: FixContext) -> None:
        path = self.crypttab_path
        record = self._boot_edit(ctx, "crypttab", path, rewrite_crypttab)
        if record is not None and record.changed:
            ctx.note(initramfs_copy_note(path))

    def add_virtio_drivers(self, ctx: FixContext) -> None:
        found = False
        for generator in self.initramfs_generators:
            if generator == "dracut" and any(ctx.fs.exists(p) for p in self.dracut_markers):
                found = True
                path = _join(self.dracut_conf_dir, self.dracut_virtio_conf)
                record = ctx.ensure_text("dracut-virtio", path, render_dracut_virtio_conf())
            elif generator == "initramfs-tools" and ctx.fs.is_dir(self.initramfs_tools_dir):
                found = True
                path = _join(self.initramfs_tools_dir, "modules")
                record = ctx.edit_text(
                    "initramfs-tools-virtio", path, ensure_initramfs_modules, create=True
                )
            else:
                continue
            if record is not None and record.changed:
                ctx.note(REGENERATE_NOTE)
        if not found:
            looked = ", ".join(self.initramfs_generators)
            ctx.skip("virtio-initramfs", "/", f"no initramfs generator found (looked for {looked})")

    # -- walks ---------------------------------------------------------------------

    @staticmethod
    def _list_dir(ctx: FixContext, name: str, directory: str) -> list[str]:
        """Entries of a guest directory, within the walk bounds; none, with a skip, beyond."""
        if not ctx.fs.is_dir(directory):
            return []
        limit = max(min(MAX_DIR_ENTRIES, ctx.walk.entries), 0)
        try:
            entries = ctx.fs.ls(directory, limit=limit)
        except TooManyEntries:
            if limit < MAX_DIR_ENTRIES:
                reason = (
                    "not examined: the fixes' budget of "
                    f"{MAX_WALK_ENTRIES} directory entries is spent"
                )
            else:
                reason = (
                    f"more than {MAX_DIR_ENTRIES} entries: not examined "
                    f"(the fixes look at most at {MAX_DIR_ENTRIES} entries of a directory)"
                )
            ctx.skip(name, directory, reason)
            return []
        ctx.walk.entries -= len(entries)
        return entries

    # -- network ------------------------------------------------------------------

    def _edit_dir(
        self,
        ctx: FixContext,
        name: str,
        directory: str,
        wanted: Callable[[str], bool],
        rewrite: Rewriter,
    ) -> None:
        entries = [entry for entry in self._list_dir(ctx, name, directory) if wanted(entry)]
        for index, entry in enumerate(entries):
            if ctx.walk.files <= 0 or ctx.walk.text <= 0:
                ctx.skip(name, directory, _budget_spent(len(entries) - index))
                return
            first = len(ctx.applied)
            self._network_edit(ctx, name, _join(directory, entry), rewrite)
            ctx.walk.files -= 1
            # Records hold the text they read (twice: before and after).
            ctx.walk.text -= sum(
                len(r.before or "") + len(r.after or "") for r in ctx.applied[first:]
            )

    @staticmethod
    def _network_edit(ctx: FixContext, name: str, path: str, rewrite: Rewriter) -> None:
        record = ctx.edit_text(name, path, rewrite)
        if record is not None and record.changed:
            ctx.note(NETWORK_NOTE)

    def fix_udev_net_rules(self, ctx: FixContext) -> None:
        self._network_edit(ctx, "udev-net-rules", self.udev_net_rules_path, rewrite_udev_net_rules)

    def fix_ifcfg(self, ctx: FixContext) -> None:
        self._edit_dir(
            ctx, "ifcfg", self.ifcfg_dir, lambda entry: entry.startswith("ifcfg-"), rewrite_ifcfg
        )

    def fix_ifupdown(self, ctx: FixContext) -> None:
        self._network_edit(ctx, "ifupdown", self.interfaces_path, rewrite_ifupdown)
        # ifupdown's default interfaces file sources every file of interfaces.d.
        self._edit_dir(
            ctx,
            "ifupdown",
            self.interfaces_dir,
            lambda entry: not entry.startswith("."),
            rewrite_ifupdown,
        )

    def fix_netplan(self, ctx: FixContext) -> None:
        # netplan reads only *.yaml.
        self._edit_dir(
            ctx, "netplan", self.netplan_dir, lambda entry: entry.endswith(".yaml"), rewrite_netplan
        )

    def fix_nm_keyfiles(self, ctx: FixContext) -> None:
        self._edit_dir(
            ctx,
            "nm-keyfile",
            self.nm_connections_dir,
            lambda entry: entry.endswith(".nmconnection"),
            rewrite_nm_keyfile,
        )

    # -- services -----------------------------------------------------------------

    def _links_in(self, ctx: FixContext, directory: str, seen: set[str]) -> list[str]:
        """Entries of a guest directory (once per real directory) that are symlinks."""
        if not ctx.fs.is_dir(directory):
            return []
        real = ctx.fs.realpath(directory)
        if real in seen:
            return []
        seen.add(real)
        paths = [_join(real, entry) for entry in self._list_dir(ctx, "vmware-tools", real)]
        return [path for path in paths if ctx.fs.is_symlink(path)]

    def disable_vmware_tools(self, ctx: FixContext) -> None:
        seen: set[str] = set()
        units = self.systemd_system_dir
        if ctx.fs.is_dir(units):
            for entry in self._list_dir(ctx, "vmware-tools", units):
                if not is_enablement_dir(entry):
                    continue
                for link in self._links_in(ctx, _join(units, entry), seen):
                    if is_vmware_unit_link(link.rsplit("/", 1)[1]):
                        ctx.remove_link("vmware-tools", link, "enables a VMware tools service")
        for directory in self.sysv_rc_dirs:
            for link in self._links_in(ctx, directory, seen):
                if is_vmware_sysv_link(link.rsplit("/", 1)[1]):
                    ctx.remove_link("vmware-tools", link, "starts the VMware tools init script")


class DebianFixer(Fixer):
    name = "debian"
    distros = frozenset({"debian", "kalilinux"})
    # initramfs-tools is Debian's default; newer releases may use dracut instead.
    initramfs_generators = ("initramfs-tools", "dracut")

    def steps(self) -> list[FixStep]:
        return [
            *super().steps(),
            self.fix_ifupdown,
            self.fix_netplan,
            self.fix_nm_keyfiles,
            self.add_virtio_drivers,
        ]


class UbuntuFixer(DebianFixer):
    name = "ubuntu"
    distros = frozenset({"ubuntu", "linuxmint"})


class RhelFixer(Fixer):
    name = "rhel"
    distros = frozenset({"rhel", "oraclelinux", "scientificlinux", "redhat-based"})
    # Before systemd, RHEL kept the runlevel links under /etc/rc.d.
    sysv_rc_dirs = (
        *Fixer.sysv_rc_dirs,
        *(f"/etc/rc.d/rc{level}.d" for level in "0123456"),
    )
    initramfs_generators = ("dracut",)

    def steps(self) -> list[FixStep]:
        return [*super().steps(), self.fix_ifcfg, self.fix_nm_keyfiles, self.add_virtio_drivers]


class CentosFixer(RhelFixer):
    name = "centos"
    distros = frozenset({"centos"})


class RockyFixer(RhelFixer):
    name = "rocky"
    distros = frozenset({"rocky"})


class AlmaFixer(RhelFixer):
    name = "almalinux"
    distros = frozenset({"almalinux"})


class FedoraFixer(RhelFixer):
    name = "fedora"
    distros = frozenset({"fedora"})


class SuseFixer(Fixer):
    name = "suse"
    distros = frozenset({"sles", "opensuse", "suse-based"})
    initramfs_generators = ("dracut",)

    def steps(self) -> list[FixStep]:
        # SUSE's own ifcfg files (/etc/sysconfig/network) do not pin by HWADDR.
        return [*super().steps(), self.fix_nm_keyfiles, self.add_virtio_drivers]


class GenericLinuxFixer(Fixer):
    """An unrecognised distribution: every fix, each acting only where its files exist."""

    name = "linux"

    def steps(self) -> list[FixStep]:
        return [
            *super().steps(),
            self.fix_ifcfg,
            self.fix_ifupdown,
            self.fix_netplan,
            self.fix_nm_keyfiles,
            self.add_virtio_drivers,
        ]


_FIXERS: tuple[type[Fixer], ...] = (
    DebianFixer,
    UbuntuFixer,
    RhelFixer,
    CentosFixer,
    RockyFixer,
    AlmaFixer,
    FedoraFixer,
    SuseFixer,
)


def no_fixer_reason(os_info: OSInfo) -> str | None:
    """Why `fixer_for` returns None for this OS; None when there is a fixer."""
    if os_info.type == "windows":
        return "Windows guests get no offline fixes here (virtio drivers need driver injection)"
    if os_info.type != "linux":
        return "the operating system was not recognised"
    return None


def fixer_for(os_info: OSInfo) -> Fixer | None:
    """The fixer for a detected OS: per distro, generic for other Linux, None otherwise."""
    if no_fixer_reason(os_info) is not None:
        return None
    for cls in _FIXERS:
        if os_info.distro in cls.distros:
            return cls()
    return GenericLinuxFixer()


def _selinux_note(ctx: FixContext) -> None:
    if not ctx.created or not ctx.fs.is_file("/etc/selinux/config"):
        return
    try:
        config = ctx.fs.cat("/etc/selinux/config", max_size=TEXT_FILE_CAP)
    except GuestPathError:
        return
    if match := _SELINUX_MODE.search(config):
        created = ", ".join(ctx.created)
        ctx.note(
            f"SELinux is {match.group(1)} in the guest and new files ({created}) have no "
            "label: relabel on first boot (touch /.autorelabel) or run restorecon"
        )


def apply_fixes(
    fs: GuestFS,
    os_info: OSInfo,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    *,
    dry_run: bool,
    volumes: VolumeTable | None = None,
) -> FixReport:
    """Run the fixer for `os_info` on the guest root `fs`; dry_run writes nothing.

    Without `volumes`, `filesystems` and `partitions` are the boot disk's. With the
    VM's `volumes` they (and `os_info.root_partition`) are numbered VM-wide, and
    /dev/sdX names of any disk of the VM are rewritten to UUIDs.
    """
    fixer = fixer_for(os_info)
    if fixer is None:
        reason = no_fixer_reason(os_info) or "no fixer for this operating system"
        return FixReport(None, dry_run, notes=(reason,))
    ctx = FixContext(fs, os_info, filesystems, partitions, dry_run=dry_run, volumes=volumes)
    if isinstance(fixer, GenericLinuxFixer):
        ctx.note(f"distribution {os_info.distro or 'unknown'}: generic Linux fixes only")
    for step in fixer.steps():
        try:
            step(ctx)
        except GuestPathError as exc:
            # One odd guest path must not stop the other fixes; say which step hit it.
            name = getattr(step, "__name__", "fix")
            ctx.failed.append(FixSkip(name, exc.path, exc.reason))
    _selinux_note(ctx)
    if dry_run:
        ctx.note("dry run: nothing was written")
    return FixReport(
        fixer=fixer.name,
        dry_run=dry_run,
        applied=tuple(ctx.applied),
        skipped=tuple(ctx.skipped),
        failed=tuple(ctx.failed),
        notes=tuple(ctx.notes),
    )
