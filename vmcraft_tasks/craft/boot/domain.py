"""A boot spec from libvirt domain XML (pure): boot the guest as its domain describes it.

The check must see the devices the converted guest will really get, so firmware,
machine type, disk bus and NIC model come from the domain XML that the libvirt writer
(craft/libvirt) produced from the guest's capabilities. What a check needs no more
of is capped (memory, vCPUs), and Secure Boot is always off: OVMF comes from this
host (`firmware.find_ovmf`), not from paths in the XML.

The XML is ours, but it is still parsed as data: anything the runner cannot honour
exactly (a network disk, a CD-ROM, a SCSI bus, an unknown NIC model) is refused with
a QemuSpecError that says what, rather than booted as something else.
"""

from __future__ import annotations

import re
from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.boot.qemu import (
    Accel,
    BootDisk,
    BootSpec,
    Bus,
    Firmware,
    QemuSpecError,
)

# A check proves the guest boots; more memory or vCPUs only load the host.
MAX_MEMORY_MIB = 2048
MAX_CPUS = 2
MAX_XML_BYTES = 1024 * 1024

# libvirt's <interface><model type> -> qemu's device.
NIC_DEVICES = {
    "virtio": "virtio-net-pci",
    "e1000e": "e1000e",
    "e1000": "e1000",
    "rtl8139": "rtl8139",
}
DISK_BUSES: dict[str, Bus] = {"virtio": "virtio", "sata": "sata"}
# Formats libvirt may name in <driver type> that qemu opens itself.
DISK_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "qed", "parallels"})
X86_ARCHES = frozenset({"x86_64", "i686"})

# libvirt's memory units, in KiB (its scaledInteger: bytes, decimal and binary).
_UNITS_KIB: dict[str, float] = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "kb": 1000 / 1024,
    "k": 1,
    "kib": 1,
    "mb": 1000**2 / 1024,
    "m": 1024,
    "mib": 1024,
    "gb": 1000**3 / 1024,
    "g": 1024**2,
    "gib": 1024**2,
    "tb": 1000**4 / 1024,
    "t": 1024**3,
    "tib": 1024**3,
}
# qemu machine names: q35, pc, and their versioned aliases (pc-q35-7.2, pc-i440fx-7.2).
_MACHINE = re.compile(r"^(q35|pc(-[a-z0-9]+(-[0-9][0-9.]*)?)?)$")


def spec_from_domain(
    xml_text: str,
    *,
    serial_log: str,
    accel: str,
    ovmf: tuple[str, str] | None,
) -> BootSpec:
    """The BootSpec that boots the domain `xml_text` describes, headless.

    Disks in XML order (the first boots), each its <source file> in its <driver type>
    on its <target bus>; `ovmf` (code, vars) is needed for a UEFI domain.
    """
    if accel not in ("tcg", "kvm"):
        raise QemuSpecError(f"accel must be tcg or kvm, not {accel!r}")
    domain = _parse(xml_text)
    os_el = domain.find("os")
    if os_el is None:
        raise QemuSpecError("domain XML has no <os> element")
    firmware: Firmware = "uefi" if _is_uefi(os_el) else "bios"
    if firmware == "uefi" and ovmf is None:
        raise QemuSpecError("the domain boots with UEFI: OVMF (code, vars) paths are needed")
    code, variables = ovmf if firmware == "uefi" and ovmf is not None else (None, None)
    checked_accel: Accel = "kvm" if accel == "kvm" else "tcg"
    return BootSpec(
        disks=_disks(domain),
        serial_log=serial_log,
        firmware=firmware,
        ovmf_code=code,
        ovmf_vars=variables,
        machine=_machine(os_el),
        memory_mib=min(_memory_mib(domain), MAX_MEMORY_MIB),
        cpus=min(_vcpus(domain), MAX_CPUS),
        accel=checked_accel,
        nic_model=_nic_model(domain),
    )


def domain_firmware(xml_text: str) -> Firmware:
    """ "uefi" when the domain boots with UEFI (<os firmware="efi"> or a <loader>), else "bios"."""
    os_el = _parse(xml_text).find("os")
    return "uefi" if os_el is not None and _is_uefi(os_el) else "bios"


def _parse(xml_text: str) -> ET.Element:
    if len(xml_text.encode()) > MAX_XML_BYTES:
        raise QemuSpecError(f"domain XML larger than {MAX_XML_BYTES} bytes")
    try:
        domain = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise QemuSpecError(f"domain XML does not parse: {exc}") from exc
    if domain.tag != "domain":
        raise QemuSpecError(f"not a libvirt domain: the root element is <{domain.tag}>")
    return domain


def _is_uefi(os_el: ET.Element) -> bool:
    return os_el.get("firmware") == "efi" or os_el.find("loader") is not None


def _machine(os_el: ET.Element) -> str:
    type_el = os_el.find("type")
    if type_el is None:
        return "q35"
    arch = type_el.get("arch", "x86_64")
    if arch not in X86_ARCHES:
        raise QemuSpecError(f"domain arch {arch!r}: the boot check runs x86 guests only")
    machine = type_el.get("machine") or "q35"
    if not _MACHINE.match(machine):
        raise QemuSpecError(f"machine type {machine!r} is neither q35 nor a pc machine")
    return machine


def _disks(domain: ET.Element) -> tuple[BootDisk, ...]:
    disks = []
    for index, disk in enumerate(domain.findall("devices/disk"), start=1):
        where = f"disk {index} of the domain"
        kind, device = disk.get("type"), disk.get("device", "disk")
        if kind != "file" or device != "disk":
            raise QemuSpecError(f"{where} is a {kind} {device}: only file disks are booted")
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if not path or not path.startswith("/"):
            raise QemuSpecError(f"{where} has no absolute <source file> ({path!r})")
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        if fmt not in DISK_FORMATS:
            # libvirt never probes a format, and neither do we: raw read as qcow2
            # could name host files as its backing.
            raise QemuSpecError(f"{where} ({path}): format {fmt!r} is not one qemu opens")
        target = disk.find("target")
        bus = target.get("bus") if target is not None else None
        if bus not in DISK_BUSES:
            raise QemuSpecError(f"{where} ({path}): bus {bus!r} (only virtio and sata)")
        disks.append(BootDisk(path, fmt, DISK_BUSES[bus]))
    if not disks:
        raise QemuSpecError("the domain has no disk to boot from")
    return tuple(disks)


def _nic_model(domain: ET.Element) -> str | None:
    interface = domain.find("devices/interface")
    if interface is None:
        return None
    model = interface.find("model")
    name = model.get("type") if model is not None else None
    if name is None:
        raise QemuSpecError("<interface> without <model type>: the guest's NIC is unknown")
    if name not in NIC_DEVICES:
        raise QemuSpecError(f"NIC model {name!r} is not one the boot check emulates")
    return NIC_DEVICES[name]


def _memory_mib(domain: ET.Element) -> int:
    memory = domain.find("currentMemory")
    if memory is None:
        memory = domain.find("memory")
    if memory is None or not (memory.text or "").strip():
        raise QemuSpecError("the domain has no <memory>")
    unit = memory.get("unit", "KiB").lower()
    if unit not in _UNITS_KIB:
        raise QemuSpecError(f"memory unit {unit!r} is not one libvirt knows")
    try:
        value = int((memory.text or "").strip())
    except ValueError as exc:
        raise QemuSpecError(f"memory {memory.text!r} is not a number") from exc
    return int(value * _UNITS_KIB[unit] // 1024)


def _vcpus(domain: ET.Element) -> int:
    vcpu = domain.find("vcpu")
    if vcpu is None:
        return 1  # libvirt's default
    vcpu_text = (vcpu.get("current") or vcpu.text or "").strip()
    if not vcpu_text.isdigit() or int(vcpu_text) < 1:
        raise QemuSpecError(f"<vcpu> {vcpu_text!r} is not a positive number")
    return int(vcpu_text)
