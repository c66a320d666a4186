"""The qemu-system-x86_64 command line for a headless test boot (pure).

Every disk is attached with `snapshot=on`: writes land in a throw-away overlay that
qemu deletes itself, so booting a source image can never change it. There is no
network unless a NIC model is asked for, and then only qemu's user-mode network
with `restrict=on`, which lets nothing out of the guest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Bus = Literal["virtio", "sata"]
Firmware = Literal["bios", "uefi"]
Accel = Literal["tcg", "kvm"]

QEMU_BINARY = "qemu-system-x86_64"
# ich9-ahci has six ports; one controller is enough for any test guest.
AHCI_PORTS = 6


class QemuSpecError(ValueError):
    """A boot spec that cannot be turned into a working qemu command line."""


@dataclass(frozen=True)
class BootDisk:
    path: str
    fmt: str = "qcow2"  # qemu's format name: qcow2, raw, vmdk, vpc, vhdx, vdi
    bus: Bus = "virtio"


@dataclass(frozen=True)
class DirectKernel:
    """Boot this kernel and initrd instead of the disk's boot loader."""

    kernel: str
    initrd: str | None = None
    append: str = ""


@dataclass(frozen=True)
class BootSpec:
    disks: tuple[BootDisk, ...]
    # A file that receives the guest's first serial port; None: qemu's stdout.
    serial_log: str | None = None
    firmware: Firmware = "bios"
    ovmf_code: str | None = None  # uefi only, read-only
    ovmf_vars: str | None = None  # uefi only, a template: attached snapshot=on like the disks
    machine: str = "q35"
    memory_mib: int = 1024
    cpus: int = 1
    accel: Accel = "tcg"
    nic_model: str | None = None  # e.g. "virtio-net-pci", "e1000"; None: no NIC at all
    direct_kernel: DirectKernel | None = None
    qemu_binary: str = QEMU_BINARY
    # A file for the firmware's debug port (isa-debugcon at 0x402): SeaBIOS writes its
    # messages there ("No bootable device."), which a guest without a serial console
    # (Windows) would otherwise only show on a screen nobody captures.
    debugcon_log: str | None = None
    # Which serial port the log is attached to: 0 (ttyS0, COM1) or 1 (ttyS1, COM2,
    # with COM1 connected to nothing), for a guest whose console is on its second port.
    serial_port: int = 0


def _opt(value: str) -> str:
    # qemu's option parser splits on commas; a literal comma is written twice.
    return value.replace(",", ",,")


def _machine_args(spec: BootSpec) -> list[str]:
    return [
        "-machine",
        spec.machine,
        "-accel",
        spec.accel,
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.cpus),
    ]


def _headless_args(spec: BootSpec) -> list[str]:
    # -nodefaults drops the default NIC, VGA, monitor and serial, so the guest
    # gets exactly what is listed here; -no-reboot turns a guest reboot into an exit.
    args = ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if spec.serial_port not in (0, 1):
        raise QemuSpecError(f"serial_port={spec.serial_port}: the log goes to port 0 or 1")
    before = ["-serial", "null"] if spec.serial_port == 1 else []
    if spec.serial_log is None:
        return [*args, *before, "-serial", "stdio", *_debugcon_args(spec.debugcon_log)]
    # append=on: the caller creates (and may watch) the file before qemu starts.
    chardev = f"file,id=serial0,path={_opt(spec.serial_log)},append=on"
    serial = ["-chardev", chardev, *before, "-serial", "chardev:serial0"]
    return [*args, *serial, *_debugcon_args(spec.debugcon_log)]


def _debugcon_args(path: str | None) -> list[str]:
    if path is None:
        return []
    chardev = f"file,id=dbg,path={_opt(path)},append=on"
    return ["-chardev", chardev, "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]


def _firmware_args(spec: BootSpec) -> list[str]:
    if spec.firmware == "bios":
        if spec.ovmf_code or spec.ovmf_vars:
            raise QemuSpecError("OVMF files given for a BIOS boot")
        return []
    if not spec.ovmf_code or not spec.ovmf_vars:
        raise QemuSpecError("a UEFI boot needs both ovmf_code and ovmf_vars")
    code = f"if=pflash,unit=0,format=raw,readonly=on,file={_opt(spec.ovmf_code)}"
    variables = f"if=pflash,unit=1,format=raw,snapshot=on,file={_opt(spec.ovmf_vars)}"
    return ["-drive", code, "-drive", variables]


def _disk_args(disks: tuple[BootDisk, ...], *, boot_from_disk: bool) -> list[str]:
    if not disks and boot_from_disk:
        # A direct kernel boot needs none (the KVM probe boots a bare kernel).
        raise QemuSpecError("a boot needs at least one disk (or a direct kernel)")
    sata = [d for d in disks if d.bus == "sata"]
    if len(sata) > AHCI_PORTS:
        raise QemuSpecError(f"{len(sata)} SATA disks, but one AHCI controller has {AHCI_PORTS}")
    args = ["-device", "ahci,id=ahci0"] if sata else []
    sata_port = 0
    for index, disk in enumerate(disks):
        drive_id = f"disk{index}"
        drive = f"if=none,id={drive_id},file={_opt(disk.path)},format={disk.fmt},snapshot=on"
        args += ["-drive", drive]
        # The first disk is the boot disk, as on the source hypervisor. A direct
        # kernel boot claims bootindex 0 itself (linuxboot option ROM).
        boot = ",bootindex=0" if index == 0 and boot_from_disk else ""
        if disk.bus == "virtio":
            device = f"virtio-blk-pci,drive={drive_id}{boot}"
        else:
            device = f"ide-hd,drive={drive_id},bus=ahci0.{sata_port}{boot}"
            sata_port += 1
        args += ["-device", device]
    return args


def _nic_args(nic_model: str | None) -> list[str]:
    if nic_model is None:
        return ["-nic", "none"]
    return ["-nic", f"user,model={nic_model},restrict=on"]


def _kernel_args(direct: DirectKernel | None) -> list[str]:
    if direct is None:
        return []
    args = ["-kernel", direct.kernel]
    if direct.initrd is not None:
        args += ["-initrd", direct.initrd]
    if direct.append:
        args += ["-append", direct.append]
    return args


def qemu_argv(spec: BootSpec) -> list[str]:
    """The full argv (program first) for booting `spec`; raises QemuSpecError if it cannot."""
    if spec.memory_mib < 64:
        raise QemuSpecError(f"memory_mib={spec.memory_mib} is too little to boot anything")
    if spec.cpus < 1:
        raise QemuSpecError(f"cpus={spec.cpus}: need at least one")
    return [
        spec.qemu_binary,
        *_machine_args(spec),
        *_headless_args(spec),
        *_firmware_args(spec),
        *_disk_args(spec.disks, boot_from_disk=spec.direct_kernel is None),
        *_nic_args(spec.nic_model),
        *_kernel_args(spec.direct_kernel),
    ]
