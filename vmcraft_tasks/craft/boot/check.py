"""`check_guest`: boot a VM's disks headless and say whether the guest came up.

The one entry point of a boot check (the fleet's boot_check step and `vmcraft
boot-check` call it). In order:

1. inspect the disks read-only (`VMCraft` for one, `GuestVM` for several) to decide
   what to boot: a Linux guest through its own boot loader when it has a serial
   console, else its default kernel directly (guest.py); a Windows guest as a
   stable-run check (it shows nothing on serial); and release the attach, so qemu is
   the only reader of the disks while it runs;
2. take firmware, machine, disk bus and NIC from the domain XML (domain.py), or the
   defaults (BIOS, or UEFI when the boot disk has an ESP; q35; virtio; no NIC);
3. pick the accelerator: KVM only when a stock kernel was seen to run on it (accel.py);
4. boot with `run.boot_check` (every disk snapshot=on, no network unless the XML has a
   NIC, and then a restricted one), which decides at the first outcome the console
   shows, and keep the console log cleaned of ANSI and CR noise.

Everything the check did and did not verify goes into `notes`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vmcraft_tasks.craft.boot import accel as accel_mod
from vmcraft_tasks.craft.boot.console import Reason, Verdict, clean
from vmcraft_tasks.craft.boot.domain import domain_firmware, spec_from_domain
from vmcraft_tasks.craft.boot.firmware import FirmwareNotFoundError, find_ovmf
from vmcraft_tasks.craft.boot.guest import (
    BootPlanError,
    GuestBoot,
    boot_plan,
    extract_kernel,
)
from vmcraft_tasks.craft.boot.qemu import BootDisk, BootSpec, DirectKernel, QemuSpecError
from vmcraft_tasks.craft.boot.run import BootLimits, BootStopped, boot_check
from vmcraft_tasks.craft.fixes.initramfs_regen import kernel_versions
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft

Result = Literal["pass", "fail", "skipped"]
StopCheck = Callable[[], str | None]

# The whole boot, from qemu's start. TCG here boots a small Debian guest in 40-80 s;
# a loaded host or a big guest needs a good margin. KVM boots in seconds.
DEFAULT_TIME_LIMIT_S = {"tcg": 600.0, "kvm": 180.0}
# A Windows guest passes when it runs this long without rebooting or exiting.
WINDOWS_STABLE_S = {"tcg": 90.0, "kvm": 60.0}
# An initramfs waits 30 s and more for its root in silence; systemd's device
# timeout is 90 s. Silence longer than this ends a Linux boot.
SILENCE_S = 150.0
DEFAULT_MEMORY_MIB = 1024

SERIAL_LOG = "serial.log"  # qemu's raw serial output
FIRMWARE_LOG = "firmware.log"  # the firmware's debug port (SeaBIOS messages)
CONSOLE_LOG = "console.log"  # the cleaned console kept with the result
KERNEL_DIR = "kernel"
# What the cleaned console log keeps: its end, where the outcome is.
CONSOLE_KEEP = 1024 * 1024
FIRMWARE_KEEP = 64 * 1024

ESP_TYPES = frozenset({"c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "ef"})
HOST_BOOT = "/boot"


@dataclass(frozen=True)
class BootCheckResult:
    result: Result
    mode: str  # "bootloader" | "direct-kernel" | "windows-stable-run" | "none"
    firmware: str  # "bios" | "uefi"
    accel: str  # "kvm" | "tcg"
    seconds: float
    evidence: list[str]  # the deciding console lines, cleaned
    reason: str  # the verdict's reason, or why the check was skipped
    notes: list[str]  # what was and was not verified
    serial_log: str | None  # the cleaned console log's path (in work_dir)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 1)
        return data


# --------------------------------------------------------------------------- pure


def default_time_limit(accel: str) -> float:
    return DEFAULT_TIME_LIMIT_S["kvm" if accel == "kvm" else "tcg"]


def has_esp(partition_types: Sequence[str]) -> bool:
    """True if any of the boot disk's partition types is an EFI system partition."""
    return any(t.lower() in ESP_TYPES for t in partition_types)


def clean_console(raw: bytes) -> str:
    """Console bytes as readable text: no ANSI escapes or control characters, every
    CR-rewritten line on a line of its own, at most CONSOLE_KEEP characters (its end)."""
    text = clean(raw.decode("utf-8", errors="replace"))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text[-CONSOLE_KEEP:]


def with_disks(spec: BootSpec, disks: Sequence[tuple[str, str]]) -> BootSpec:
    """`spec` booting `disks` (path, qemu format), each on the bus the spec has for
    that position: the domain XML decides buses, the caller which files."""
    if len(disks) != len(spec.disks):
        raise QemuSpecError(f"{len(disks)} disk(s) given, but the domain XML has {len(spec.disks)}")
    booted = tuple(
        BootDisk(os.path.abspath(path), fmt, old.bus)
        for (path, fmt), old in zip(disks, spec.disks, strict=True)
    )
    return replace(spec, disks=booted)


def default_spec(disks: Sequence[tuple[str, str]], *, uefi: bool, serial_log: str) -> BootSpec:
    """The spec without a domain XML: q35, virtio disks, no NIC, BIOS or UEFI."""
    return BootSpec(
        disks=tuple(BootDisk(os.path.abspath(p), f, "virtio") for p, f in disks),
        serial_log=serial_log,
        firmware="uefi" if uefi else "bios",
        memory_mib=DEFAULT_MEMORY_MIB,
    )


def windows_verdict(verdict: Verdict, stable_s: float) -> tuple[Result, str, list[str]]:
    """A Windows stable run's result from the runner's verdict: running for the whole
    window passes; qemu's exit (a blue screen reboots, -no-reboot exits) or no boot
    device fails; a console outcome (EMS/SAC, rare) counts as it says."""
    evidence = list(verdict.evidence)
    if verdict.reason is Reason.TIMEOUT:
        note = f"ran {stable_s:g} s without rebooting or stopping"
        return "pass", "stable-run", [*evidence[:-1], note]
    if verdict.reason is Reason.QEMU_EXITED:
        return "fail", "guest-reset", [*evidence, "the guest rebooted or stopped (a blue screen)"]
    return verdict.result, str(verdict.reason), evidence


def newest_host_kernel(boot_names: Sequence[str]) -> str | None:
    versions = kernel_versions(boot_names)
    return f"{HOST_BOOT}/vmlinuz-{versions[-1]}" if versions else None


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class _Found:
    """What inspecting the disks decided; nothing in it refers to the attach."""

    os_type: str  # linux | windows | unknown | none
    has_esp: bool
    plan: GuestBoot | None = None
    kernel: str | None = None  # host copies of the guest's kernel and initrd
    initrd: str | None = None
    skip: str | None = None  # why nothing can be booted
    notes: tuple[str, ...] = field(default=())


def _guest_trees(root: OSInfo, mounts: Mapping[int, MountResult]) -> tuple[GuestFS, GuestFS | None]:
    mount = mounts.get(root.root_partition)
    if mount is None or not mount.ok:
        raise BootPlanError(f"the guest root (volume {root.root_partition}) is not mounted")
    boot = None
    for resolved in root.fstab:
        number = resolved.resolved_partition
        if resolved.entry.mountpoint.rstrip("/") == "/boot" and number is not None:
            boot_mount = mounts.get(number)
            if boot_mount is None or not boot_mount.ok:
                raise BootPlanError(f"the guest's /boot (volume {number}) is not mounted")
            boot = GuestFS(boot_mount.mountpoint)
    return GuestFS(mount.mountpoint), boot


def _plan(
    roots: Sequence[OSInfo],
    mounts: Mapping[int, MountResult],
    esp: bool,
    work_dir: str,
    *,
    probe_kernel: bool,
) -> _Found:
    if not roots:
        return _Found("none", esp, skip="no operating system found on the disks: nothing to boot")
    root = roots[0]
    notes = [f"{len(roots)} OS roots found: checked the first"] if len(roots) > 1 else []
    if root.type == "windows":
        return _Found("windows", esp, notes=tuple(notes))
    if root.type != "linux":
        return _Found(root.type, esp, skip=f"operating system type {root.type!r}: no boot check")
    try:
        root_fs, boot_fs = _guest_trees(root, mounts)
        plan = boot_plan(root_fs, boot_fs, root)
        kernel = initrd = None
        dest = os.path.join(work_dir, KERNEL_DIR)
        if plan.mode == "direct-kernel":
            kernel, initrd = extract_kernel(root_fs, plan, dest, boot_fs=boot_fs)
        elif probe_kernel and plan.kernel_path_in_guest is not None:
            # Only to probe KVM with: the boot itself goes through the boot loader.
            bare = replace(plan, initrd_path_in_guest=None)
            kernel, _ = extract_kernel(root_fs, bare, dest, boot_fs=boot_fs)
    except BootPlanError as exc:
        return _Found("linux", esp, skip=f"cannot plan a boot: {exc}", notes=tuple(notes))
    return _Found("linux", esp, plan, kernel, initrd, notes=(*notes, *plan.notes))


def _inspect(
    disks: Sequence[tuple[str, str]],
    work_dir: str,
    settings: CraftSettings | None,
    *,
    probe_kernel: bool,
) -> _Found:
    """Attach read-only, decide, copy what is needed out, and release the attach."""
    if len(disks) == 1:
        path, fmt = disks[0]
        g = VMCraft(path, readonly=True, settings=settings)
        try:
            g.launch(fmt=fmt)
            report = g.inspect()
            esp = has_esp([p.type for p in report.partitions])
            return _plan(report.roots, report.mounts, esp, work_dir, probe_kernel=probe_kernel)
        finally:
            g.shutdown()
    vm = GuestVM(
        [p for p, _ in disks], readonly=True, settings=settings, formats=[f for _, f in disks]
    )
    try:
        vm.launch()
        vm_report = vm.inspect()
        types = [str(p.get("type", "")) for p in vm_report.disks[0]["partitions"]]
        return _plan(
            vm_report.roots, vm_report.mounts, has_esp(types), work_dir, probe_kernel=probe_kernel
        )
    finally:
        vm.shutdown()


# --------------------------------------------------------------------------- the check


def host_kernel() -> str | None:
    """This host's newest stock kernel, the preferred one to probe KVM with: its path
    does not change, so one probe serves the whole process (accel.choose_accel)."""
    try:
        return newest_host_kernel(os.listdir(HOST_BOOT))
    except OSError:
        return None


def _choose_accel(
    requested: str, host: str | None, found: _Found, cache_dir: str | None
) -> tuple[str, str]:
    if requested in ("tcg", "kvm"):
        return requested, f"{requested} as asked (not probed)"
    kernel = host or found.kernel
    if kernel is None:
        return (
            "tcg",
            "TCG: no stock kernel (the host's /boot/vmlinuz-* or the guest's) to probe KVM with",
        )
    chosen, why = accel_mod.choose_accel(kernel, cache_dir=cache_dir)
    probed = kernel if host else "the guest's own kernel"
    return chosen, f"{chosen.upper()}: {why} (probed with {probed})"


def _firmware(domain_xml: str | None, found: _Found) -> str:
    if domain_xml is not None:
        return domain_firmware(domain_xml)
    return "uefi" if found.has_esp else "bios"


def _spec(
    disks: Sequence[tuple[str, str]],
    domain_xml: str | None,
    *,
    firmware: str,
    accel: str,
    ovmf: tuple[str, str] | None,
    work_dir: str,
) -> tuple[BootSpec, list[str]]:
    serial_log = os.path.join(work_dir, SERIAL_LOG)
    if firmware == "uefi" and ovmf is None:
        ovmf = find_ovmf()
    if domain_xml is not None:
        spec = with_disks(
            spec_from_domain(domain_xml, serial_log=serial_log, accel=accel, ovmf=ovmf), disks
        )
        notes = ["firmware, machine, disk bus and NIC from the domain XML"]
    else:
        spec = default_spec(disks, uefi=firmware == "uefi", serial_log=serial_log)
        spec = replace(spec, accel="kvm" if accel == "kvm" else "tcg")
        if ovmf is not None and spec.firmware == "uefi":
            spec = replace(spec, ovmf_code=ovmf[0], ovmf_vars=ovmf[1])
        notes = [
            "no domain XML: q35, virtio disks, no NIC, "
            + ("UEFI (the boot disk has an ESP)" if firmware == "uefi" else "BIOS (no ESP)")
        ]
    if spec.firmware == "uefi":
        notes.append(f"UEFI with Secure Boot off ({spec.ovmf_code})")
    nic = f"NIC {spec.nic_model} on a restricted user network" if spec.nic_model else "no NIC"
    notes.append(f"every disk attached snapshot=on (nothing written to them); {nic}")
    return replace(spec, debugcon_log=os.path.join(work_dir, FIRMWARE_LOG)), notes


def _mode_notes(found: _Found, stable_s: float) -> list[str]:
    if found.os_type == "windows":
        return [
            f"Windows stable run: judged by {stable_s:g} s without a reboot or exit "
            "(a blue screen reboots, -no-reboot turns that into qemu's exit) and by the "
            "firmware's boot messages; the desktop or login screen was NOT verified (no "
            "display is captured) and no guest agent was asked"
        ]
    assert found.plan is not None
    if found.plan.mode == "bootloader":
        return [f"{found.plan.reason}: firmware, boot loader, kernel and services verified"]
    return [
        f"{found.plan.reason}; the boot loader was bypassed: GRUB and the firmware's "
        "boot from disk were NOT verified, everything from the kernel on was"
    ]


def _write_console(work_dir: str, windows: bool) -> str:
    serial = Path(work_dir, SERIAL_LOG)
    text = clean_console(serial.read_bytes()) if serial.exists() else ""
    firmware = Path(work_dir, FIRMWARE_LOG)
    if windows and firmware.exists():
        shown = clean_console(firmware.read_bytes())[-FIRMWARE_KEEP:]
        if shown.strip():
            text += "\n--- firmware debug port (0x402) ---\n" + shown
    path = os.path.join(work_dir, CONSOLE_LOG)
    Path(path).write_text(text)
    return path


def _skipped(
    reason: str,
    *,
    firmware: str,
    accel: str,
    mode: str = "none",
    notes: Sequence[str] = (),
    seconds: float = 0.0,
) -> BootCheckResult:
    return BootCheckResult("skipped", mode, firmware, accel, seconds, [], reason, list(notes), None)


@dataclass(frozen=True)
class _Request:
    disks: Sequence[tuple[str, str]]
    domain_xml: str | None
    work_dir: str
    time_limit_s: float | None
    accel: str
    should_stop: StopCheck | None
    on_qemu: Callable[[int], None] | None
    settings: CraftSettings | None
    ovmf: tuple[str, str] | None
    windows_stable_s: float | None

    def stop_reason(self) -> str | None:
        return self.should_stop() if self.should_stop is not None else None


@dataclass(frozen=True)
class _Boot:
    """One boot, ready to run."""

    spec: BootSpec
    limits: BootLimits
    mode: str
    stable_s: float
    notes: list[str]


def check_guest(
    disks: Sequence[tuple[str, str]],
    *,
    domain_xml: str | None = None,
    work_dir: str,
    time_limit_s: float | None = None,
    accel: str = "auto",
    should_stop: StopCheck | None = None,
    on_qemu: Callable[[int], None] | None = None,
    settings: CraftSettings | None = None,
    ovmf: tuple[str, str] | None = None,
    windows_stable_s: float | None = None,
) -> BootCheckResult:
    """Boot `disks` (path, qemu format; the boot disk first) and judge the guest.

    `domain_xml` (when given) decides firmware, machine, disk bus and NIC; `work_dir`
    receives the serial log (its path is in qemu's command line), the firmware log and
    the cleaned console log; kernels copied out of the guest are removed again.
    `should_stop` is polled: a reason kills qemu at once and the result is "skipped"
    with that reason. `on_qemu(pid)` runs right after qemu started. `ovmf` (code,
    vars) overrides the host's OVMF; `windows_stable_s` the Windows stable window.
    """
    if not disks:
        raise QemuSpecError("a boot check needs at least one disk")
    if accel not in ("auto", "tcg", "kvm"):
        raise ValueError(f"accel must be auto, tcg or kvm, not {accel!r}")
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    request = _Request(
        disks,
        domain_xml,
        work_dir,
        time_limit_s,
        accel,
        should_stop,
        on_qemu,
        settings,
        ovmf,
        windows_stable_s,
    )
    try:
        return _check(request)
    finally:
        shutil.rmtree(os.path.join(work_dir, KERNEL_DIR), ignore_errors=True)


def _check(req: _Request) -> BootCheckResult:
    if (why := req.stop_reason()) is not None:
        notes = ["stopped before the disks were inspected"]
        return _skipped(why, firmware="bios", accel="tcg", notes=notes)
    host = host_kernel() if req.accel == "auto" else None
    probe_kernel = req.accel == "auto" and host is None
    found = _inspect(req.disks, req.work_dir, req.settings, probe_kernel=probe_kernel)
    firmware = _firmware(req.domain_xml, found)
    probes = req.settings.work_dir if req.settings is not None else None
    chosen, accel_reason = _choose_accel(req.accel, host, found, probes)
    notes = [*found.notes, f"accel {accel_reason}"]
    if found.skip is not None:
        return _skipped(found.skip, firmware=firmware, accel=chosen, notes=notes)
    if (why := req.stop_reason()) is not None:
        notes.append("stopped before qemu started")
        return _skipped(why, firmware=firmware, accel=chosen, notes=notes)
    try:
        boot = _prepare(req, found, firmware, chosen)
    except FirmwareNotFoundError as exc:
        return _skipped(f"a UEFI guest, but {exc}", firmware=firmware, accel=chosen, notes=notes)
    notes += boot.notes
    windows = found.os_type == "windows"
    try:
        verdict = boot_check(
            boot.spec, boot.limits, should_stop=req.should_stop, on_start=req.on_qemu
        )
    except BootStopped as exc:
        stopped = _skipped(
            exc.reason,
            firmware=boot.spec.firmware,
            accel=chosen,
            mode=boot.mode,
            notes=notes,
            seconds=exc.seconds,
        )
        return replace(stopped, serial_log=_write_console(req.work_dir, windows))
    console = _write_console(req.work_dir, windows)
    if windows:
        result, reason, evidence = windows_verdict(verdict, boot.stable_s)
    else:
        result, reason, evidence = verdict.result, str(verdict.reason), list(verdict.evidence)
    return BootCheckResult(
        result,
        boot.mode,
        boot.spec.firmware,
        chosen,
        verdict.seconds,
        evidence,
        reason,
        notes,
        console,
    )


def _prepare(req: _Request, found: _Found, firmware: str, accel: str) -> _Boot:
    spec, notes = _spec(
        req.disks,
        req.domain_xml,
        firmware=firmware,
        accel=accel,
        ovmf=req.ovmf,
        work_dir=req.work_dir,
    )
    limit = req.time_limit_s or default_time_limit(accel)
    stable_s = min(req.windows_stable_s or WINDOWS_STABLE_S[accel], limit)
    notes += _mode_notes(found, stable_s)
    if found.os_type == "windows":
        # Windows is silent on serial: silence is no failure, the window's end a pass.
        limits = BootLimits(overall_s=stable_s, silence_s=stable_s + 60.0)
        return _Boot(spec, limits, "windows-stable-run", stable_s, notes)
    assert found.plan is not None
    limits = BootLimits(overall_s=limit, silence_s=min(SILENCE_S, limit))
    spec = replace(spec, serial_port=found.plan.serial_port)
    if found.plan.mode == "direct-kernel":
        assert found.kernel is not None and found.plan.cmdline is not None
        direct = DirectKernel(found.kernel, found.initrd, found.plan.cmdline)
        spec = replace(spec, direct_kernel=direct)
    return _Boot(spec, limits, found.plan.mode, stable_s, notes)
