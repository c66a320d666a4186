"""Make one inspected guest ready for KVM and say whether it is: the honest end of a VM.

For a Linux root (mounted as the guest's whole tree, /boot inside it): the offline
fixes, the initramfs rebuilt in a sandbox with the guest's own generator, then the
guest capabilities from what its kernels can really load at boot, and the device
names it still depends on. For Windows: the capabilities from its driver services.

`problem` is set whenever the tool knows the guest would not boot as handed back
(a fix that could not be written, a failed or refused initramfs rebuild, a device
name no bus provides, no driver for any disk bus, an LV on the kernel command line
the VM does not have). A caller must then fail the VM with that reason instead of
calling it done.

A VM of several disks or with LVM passes its `volumes` (filesystems and partitions
then numbered VM-wide) and its `lvs`: device names of every disk are fixed, the
kernel command lines' LVM names are checked against the VM's LVs, and a root or /usr
on an LV gets an initramfs that activates LVM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.fixes.devicenames import DeviceNameUse, device_name_uses
from vmcraft_tasks.craft.fixes.distros import apply_fixes
from vmcraft_tasks.craft.fixes.initramfs_regen import (
    Generator,
    InitramfsError,
    InitramfsReport,
    detect_generator,
    find_kernels,
    initramfs_modules,
    regenerate_initramfs,
)
from vmcraft_tasks.craft.fixes.lvmboot import (
    LVFacts,
    LvmBootFinding,
    check_lvm_boot,
    lv_mounts,
    read_boot_config,
)
from vmcraft_tasks.craft.fixes.model import FixReport
from vmcraft_tasks.craft.guestcaps import (
    GuestCaps,
    KernelDrivers,
    kernel_drivers,
    linux_caps,
    unknown_os_caps,
    windows_caps,
)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect.windows import windows_driver_facts
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import VolumeTable

Mode = Literal["apply", "dry_run", "off"]
# SATA disks need the AHCI controller driver and the SCSI disk driver at boot.
SATA_BOOT_MODULES = ("ahci", "sd_mod")


class GuestNotReadyError(VMCraftError):
    """The guest would not boot on KVM as it would be handed back: the VM must fail."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Preparation:
    os_type: str
    mode: Mode
    guestcaps: GuestCaps
    fixes: FixReport | None = None
    initramfs: InitramfsReport | None = None
    device_names: tuple[DeviceNameUse, ...] = ()
    kernels: tuple[KernelDrivers, ...] = ()
    notes: tuple[str, ...] = ()
    problem: str | None = None
    lvm_boot: tuple[LvmBootFinding, ...] = ()  # LVM names on kernel command lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "os_type": self.os_type,
            "mode": self.mode,
            "guestcaps": self.guestcaps.to_dict(),
            "fixes": None if self.fixes is None else self.fixes.to_dict(),
            "initramfs": None if self.initramfs is None else self.initramfs.to_dict(),
            "device_names": [use.to_dict() for use in self.device_names],
            "kernels": [
                {k: v for k, v in kernel.to_dict().items() if k != "installed"}
                for kernel in self.kernels
            ],
            "notes": list(self.notes),
            "problem": self.problem,
            "lvm_boot": [finding.to_dict() for finding in self.lvm_boot],
        }


@dataclass
class _Findings:
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def prepare_guest(
    root: str,
    os_info: OSInfo,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    *,
    mode: Mode,
    timeout_s: float = 900.0,
    volumes: VolumeTable | None = None,
    lvs: Sequence[LVFacts] | None = None,
) -> Preparation:
    """Fix (mode "apply"), report what would be done ("dry_run"), or only look ("off").

    Without `volumes`, `filesystems`, `partitions` and `os_info` describe the boot
    disk alone. With the VM's `volumes` they are numbered VM-wide (`craft.volumes`).
    `lvs` are the VM's LVs (`craft.guestvm.LVInfo`: vg, lv, and the reason one cannot
    be used); given (even empty), the guest's kernel command lines are checked
    against them.
    """
    if os_info.type == "linux":
        return _prepare_linux(
            root,
            os_info,
            filesystems,
            partitions,
            mode=mode,
            timeout_s=timeout_s,
            volumes=volumes,
            lvs=lvs,
        )
    if os_info.type == "windows":
        return _prepare_windows(root, mode)
    return Preparation(
        os_type=os_info.type,
        mode=mode,
        guestcaps=unknown_os_caps(os_info.type),
        problem="the operating system on partition "
        f"{os_info.root_partition} was not recognised: {'; '.join(os_info.notes) or 'unknown'}",
    )


def _prepare_windows(root: str, mode: Mode) -> Preparation:
    drivers = windows_driver_facts(GuestFS(root, case_insensitive=True))
    notes = ["Windows guests get no offline fixes: devices follow the drivers it has"]
    return Preparation("windows", mode, windows_caps(drivers), notes=tuple(notes))


def _fix_problems(report: FixReport) -> list[str]:
    return [f"fix {f.name} could not be applied to {f.path}: {f.reason}" for f in report.failed]


def _rebuild(
    root: str,
    os_info: OSInfo,
    mode: Mode,
    timeout_s: float,
    found: _Findings,
    *,
    needs_lvm: str | None = None,
) -> InitramfsReport | None:
    if mode == "off":
        found.notes.append("initramfs not rebuilt: fixes are switched off for this VM")
        return None
    try:
        # Rebuilt even when the image already has virtio_blk: it embeds copies of the
        # configs the fixes just rewrote (modules list, resume device, crypttab).
        report = regenerate_initramfs(
            root,
            arch=os_info.arch,
            dry_run=mode == "dry_run",
            timeout_s=timeout_s,
            force=True,
            needs_lvm=needs_lvm,
        )
    except InitramfsError as exc:
        tail = " | ".join(line.strip() for line in exc.output_tail.splitlines() if line.strip())
        found.problems.append(f"initramfs: {exc.reason}" + (f"; output: {tail}" if tail else ""))
        return exc.report
    if report.lvm is not None:
        found.notes.append(f"initramfs: {report.lvm}")
    return report


def _needs_lvm(mounts: dict[str, tuple[str, str]]) -> str | None:
    """Why the initramfs must activate LVM ("/ is on LV rl/root"), or None."""
    said = [f"{mountpoint} is on LV {vg}/{lv}" for mountpoint, (vg, lv) in mounts.items()]
    return " and ".join(said) or None


def _lvm_boot(
    root: str,
    lvs: Sequence[LVFacts],
    mounts: dict[str, tuple[str, str]],
    found: _Findings,
) -> list[LvmBootFinding]:
    """The kernel command lines' LVM names checked against the VM's LVs."""
    fs = GuestFS(root)
    config = read_boot_config(fs)
    generator = detect_generator(fs)
    # Only dracut reads rd.lvm.*; with no generator at all, judge as dracut would.
    dracut = generator is None or generator.kind is Generator.DRACUT
    findings = check_lvm_boot(
        config.cmdlines,
        lvs,
        root_lv=mounts.get("/"),
        dracut=dracut,
        dm_names=config.dm_names,
    )
    for finding in findings:
        (found.problems if finding.fatal else found.notes).append(f"kernel command line: {finding}")
    found.notes += config.notes
    return findings


def _kernel_drivers(
    root: str, arch: str | None, report: InitramfsReport | None, found: _Findings
) -> list[KernelDrivers]:
    fs = GuestFS(root)
    # What the live image holds now: after a rebuild its new list; in a dry run the
    # image was only listed.
    listed = {
        k.kernel: k.modules_after if k.modules_after is not None else k.modules_before
        for k in (report.kernels if report else ())
    }
    drivers = []
    for kernel in find_kernels(fs):
        modules = listed.get(kernel.version)
        if modules is None:
            try:
                modules = initramfs_modules(root, kernel.version, arch=arch)
            except VMCraftError as exc:
                found.notes.append(f"kernel {kernel.version}: initramfs unreadable: {exc}")
        drivers.append(kernel_drivers(fs, kernel.version, modules))
    return drivers


def _sata_gaps(kernels: Sequence[KernelDrivers]) -> list[str]:
    gaps = []
    for kernel in kernels:
        at_boot = kernel.builtin | (kernel.initramfs_modules or frozenset())
        missing = [m for m in SATA_BOOT_MODULES if m not in at_boot]
        if missing:
            gaps.append(f"kernel {kernel.version}: {', '.join(missing)} not in its initramfs")
    return gaps


def _with_device_names(
    caps: GuestCaps, uses: Sequence[DeviceNameUse], found: _Findings
) -> GuestCaps:
    """A guest that still names /dev/sdX boots only where its disk is an sd* disk."""
    unbound = [use for use in uses if not use.sd_bus_keeps_it]
    if unbound:
        listed = "; ".join(str(use) for use in unbound)
        found.problems.append(
            f"the guest depends on device names no KVM disk bus provides: {listed}"
        )
    sd_only = [use for use in uses if use.sd_bus_keeps_it]
    if not sd_only or caps.block_bus == "sata":
        return caps
    listed = "; ".join(str(use) for use in sd_only)
    reason = f"{listed}: only a SATA disk keeps that name, so the disks are on SATA"
    return replace(caps, block_bus="sata", reasons=(*caps.reasons, reason))


def _prepare_linux(
    root: str,
    os_info: OSInfo,
    filesystems: Sequence[Filesystem],
    partitions: Sequence[Partition],
    *,
    mode: Mode,
    timeout_s: float,
    volumes: VolumeTable | None = None,
    lvs: Sequence[LVFacts] | None = None,
) -> Preparation:
    found = _Findings()
    fixes = apply_fixes(
        GuestFS(root),
        os_info,
        filesystems,
        partitions,
        dry_run=mode != "apply",
        volumes=volumes,
    )
    if mode == "apply":
        found.problems += _fix_problems(fixes)
    on_lvs = lv_mounts(os_info, volumes, lvs) if volumes is not None or lvs is not None else {}
    rebuilt = _rebuild(root, os_info, mode, timeout_s, found, needs_lvm=_needs_lvm(on_lvs))
    kernels = _kernel_drivers(root, os_info.arch, rebuilt, found)
    if not kernels:
        found.problems.append("no bootable kernel found (/boot/vmlinuz-* with /lib/modules/*)")
    caps = linux_caps(kernels)
    # In a dry run the guest is unchanged: judge what a real run would hand back only
    # by what the fixes report, not by the untouched files.
    uses = [] if mode == "dry_run" else device_name_uses(GuestFS(root), volumes)
    caps = _with_device_names(caps, uses, found)
    lvm_boot = _lvm_boot(root, lvs, on_lvs, found) if lvs is not None else []
    if caps.block_bus == "sata" and kernels and (gaps := _sata_gaps(kernels)):
        found.problems.append(
            "no disk bus the guest can boot from: " + "; ".join((*caps.reasons, *gaps))
        )
    problem = "; ".join(found.problems) if found.problems and mode != "dry_run" else None
    if mode == "dry_run" and found.problems:
        found.notes += [f"a real run would fail: {p}" for p in found.problems]
    return Preparation(
        os_type="linux",
        mode=mode,
        guestcaps=caps,
        fixes=fixes,
        initramfs=rebuilt,
        device_names=tuple(uses),
        kernels=tuple(kernels),
        notes=tuple(found.notes),
        problem=problem,
        lvm_boot=tuple(lvm_boot),
    )
