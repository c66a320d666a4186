"""A boot spec from domain XML (craft/boot/domain.py), on what the project's libvirt
writer really renders for a guest."""

from __future__ import annotations

from typing import Any

import pytest

from vmcraft_tasks.craft.boot.domain import domain_firmware, spec_from_domain
from vmcraft_tasks.craft.boot.qemu import BootDisk, QemuSpecError, qemu_argv
from vmcraft_tasks.craft.guestcaps import CAPS_UNKNOWN, GuestCaps
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.libvirt import (
    DiskSpec,
    DomainSpec,
    NetSpec,
    defaults_from_guest,
    render_domain,
)

DEBIAN12 = OSInfo(root_partition=1, type="linux", distro="debian", major=12).to_dict()
WIN2019 = OSInfo(root_partition=2, type="windows", distro="windows", major=10).to_dict()
VIRTIO = GuestCaps("virtio", "virtio", True, True, evidence=("drivers seen",))
OVMF = ("/fw/OVMF_CODE_4M.fd", "/fw/OVMF_VARS_4M.fd")
LOG = "/work/serial.log"


def rendered(
    *,
    os_info: dict[str, Any] = DEBIAN12,
    has_esp: bool = False,
    caps: GuestCaps | None = None,
    disks: int = 1,
    networks: int = 1,
    memory_mib: int = 1024,
    vcpus: int = 1,
) -> str:
    """Domain XML as the conversion writes it (outputs.domain_spec's path)."""
    spec = DomainSpec(
        name="vm1",
        memory_mib=memory_mib,
        vcpus=vcpus,
        disks=[
            DiskSpec(f"/images/vm1-{i}.qcow2", "qcow2", f"vd{chr(ord('a') + i)}")
            for i in range(disks)
        ],
        networks=[NetSpec() for _ in range(networks)],
        os_info=os_info,
    )
    return render_domain(defaults_from_guest(os_info, has_esp, caps).apply(spec))


def test_bios_guest_in_compatibility_mode() -> None:
    spec = spec_from_domain(rendered(caps=CAPS_UNKNOWN), serial_log=LOG, accel="tcg", ovmf=None)
    assert spec.disks == (BootDisk("/images/vm1-0.qcow2", "qcow2", "sata"),)
    assert (spec.firmware, spec.ovmf_code, spec.ovmf_vars) == ("bios", None, None)
    assert (spec.machine, spec.accel, spec.memory_mib, spec.cpus) == ("q35", "tcg", 1024, 1)
    assert spec.nic_model == "e1000e"
    assert spec.serial_log == LOG
    assert spec.direct_kernel is None


def test_uefi_virtio_guest_with_two_disks_boots_the_first() -> None:
    xml = rendered(has_esp=True, caps=VIRTIO, disks=2)
    spec = spec_from_domain(xml, serial_log=LOG, accel="kvm", ovmf=OVMF)
    assert [(d.path, d.fmt, d.bus) for d in spec.disks] == [
        ("/images/vm1-0.qcow2", "qcow2", "virtio"),
        ("/images/vm1-1.qcow2", "qcow2", "virtio"),
    ]
    assert (spec.firmware, spec.ovmf_code, spec.ovmf_vars) == ("uefi", *OVMF)
    assert (spec.accel, spec.nic_model) == ("kvm", "virtio-net-pci")
    argv = qemu_argv(spec)
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in argv
    assert "virtio-blk-pci,drive=disk1" in argv


def test_windows_guest_keeps_its_emulated_devices() -> None:
    spec = spec_from_domain(
        rendered(os_info=WIN2019, has_esp=True), serial_log=LOG, accel="tcg", ovmf=OVMF
    )
    assert spec.firmware == "uefi"
    assert spec.disks[0].bus == "sata"
    assert spec.nic_model == "e1000e"


def test_memory_and_vcpus_are_capped_for_a_check() -> None:
    xml = rendered(memory_mib=16384, vcpus=8)
    spec = spec_from_domain(xml, serial_log=LOG, accel="tcg", ovmf=None)
    assert (spec.memory_mib, spec.cpus) == (2048, 2)


def test_no_interface_means_no_nic() -> None:
    spec = spec_from_domain(rendered(networks=0), serial_log=LOG, accel="tcg", ovmf=None)
    assert spec.nic_model is None
    assert qemu_argv(spec)[-2:] == ["-nic", "none"]


def test_domain_firmware() -> None:
    assert domain_firmware(rendered()) == "bios"
    assert domain_firmware(rendered(has_esp=True)) == "uefi"


def _domain(
    os_part: str = '<type arch="x86_64" machine="q35">hvm</type>', devices: str = ""
) -> str:
    disk = devices or (
        '<disk type="file" device="disk"><driver name="qemu" type="raw"/>'
        '<source file="/i/a.raw"/><target dev="vda" bus="virtio"/></disk>'
    )
    return (
        '<domain type="kvm"><name>x</name><memory unit="GiB">1</memory>'
        f"<os>{os_part}</os><devices>{disk}</devices></domain>"
    )


@pytest.mark.parametrize(
    ("machine", "expected"),
    [("pc-q35-7.2", "pc-q35-7.2"), ("pc-i440fx-7.2", "pc-i440fx-7.2"), ("pc", "pc")],
)
def test_versioned_machine_aliases_are_kept(machine: str, expected: str) -> None:
    xml = _domain(f'<type arch="x86_64" machine="{machine}">hvm</type>')
    spec = spec_from_domain(xml, serial_log=LOG, accel="tcg", ovmf=None)
    assert spec.machine == expected
    assert spec.memory_mib == 1024  # unit="GiB"


def test_a_loader_means_uefi() -> None:
    loader = (
        '<type arch="x86_64" machine="q35">hvm</type>'
        '<loader readonly="yes" type="pflash">/usr/share/OVMF/OVMF_CODE_4M.fd</loader>'
    )
    spec = spec_from_domain(_domain(loader), serial_log=LOG, accel="tcg", ovmf=OVMF)
    # The host's OVMF, not the path in the XML (that is the libvirt host's).
    assert (spec.firmware, spec.ovmf_code) == ("uefi", OVMF[0])


DISK = (
    '<driver name="qemu" type="qcow2"/><source file="/i/a.qcow2"/><target dev="vda" bus="{bus}"/>'
)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain", "does not parse"),
        ("<network><name>x</name></network>", "root element is <network>"),
        (_domain('<type arch="aarch64" machine="virt">hvm</type>'), "x86 guests only"),
        (_domain('<type arch="x86_64" machine="isapc,accel=kvm">hvm</type>'), "neither q35"),
        (
            _domain(devices='<disk type="network" device="disk"><source protocol="nbd"/></disk>'),
            "network disk: only file disks",
        ),
        (
            _domain(devices=f'<disk type="file" device="cdrom">{DISK.format(bus="sata")}</disk>'),
            "file cdrom",
        ),
        (
            _domain(devices=f'<disk type="file" device="disk">{DISK.format(bus="scsi")}</disk>'),
            "bus 'scsi'",
        ),
        (
            _domain(
                devices='<disk type="file" device="disk"><source file="/i/a"/>'
                '<target dev="vda" bus="virtio"/></disk>'
            ),
            "format None",
        ),
        (
            _domain(
                devices='<disk type="file" device="disk"><driver type="raw"/>'
                '<source file="a.raw"/><target dev="vda" bus="virtio"/></disk>'
            ),
            "absolute",
        ),
        (_domain(devices="<controller type='usb'/>"), "no disk"),
    ],
)
def test_what_cannot_be_booted_exactly_is_refused(xml: str, message: str) -> None:
    with pytest.raises(QemuSpecError, match=message):
        spec_from_domain(xml, serial_log=LOG, accel="tcg", ovmf=None)


def test_nic_models() -> None:
    xml = rendered()
    for model, device in [("virtio", "virtio-net-pci"), ("e1000", "e1000"), ("e1000e", "e1000e")]:
        changed = xml.replace('<model type="e1000e" />', f'<model type="{model}" />')
        assert spec_from_domain(changed, serial_log=LOG, accel="tcg", ovmf=None).nic_model == device
    with pytest.raises(QemuSpecError, match="NIC model 'ne2k_pci'"):
        spec_from_domain(
            xml.replace('<model type="e1000e" />', '<model type="ne2k_pci" />'),
            serial_log=LOG,
            accel="tcg",
            ovmf=None,
        )


def test_uefi_without_ovmf_and_a_bad_accel_are_refused() -> None:
    with pytest.raises(QemuSpecError, match="OVMF"):
        spec_from_domain(rendered(has_esp=True), serial_log=LOG, accel="tcg", ovmf=None)
    with pytest.raises(QemuSpecError, match="accel"):
        spec_from_domain(rendered(), serial_log=LOG, accel="hvf", ovmf=None)
