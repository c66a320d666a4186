"""libvirt domain XML: golden files, guest-derived defaults, osinfo ids, spec checks.

Golden files live in tests/golden as <case>-in.json / <case>-out.xml. An input
carries the guest's capabilities either as the report records them ("guestcaps", a
GuestCaps.to_dict()) or as the facts they are derived from ("kernels" for Linux,
"windows_drivers" for Windows), so the derivation is golden-tested too. After an
intended change to the output, regenerate them with
    VMCRAFT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_libvirt_xml.py
and review the diff of the .xml files. Every rendered document is also checked
with libvirt's own virt-xml-validate.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.guestcaps import (
    CAPS_UNKNOWN,
    CAPS_UNKNOWN_REASON,
    GuestCaps,
    KernelDrivers,
    WindowsDrivers,
    linux_caps,
    windows_caps,
)
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.libvirt import (
    GUESTCAPS_NS,
    LIBOSINFO_NS,
    DiskSpec,
    DomainSpec,
    DomainSpecError,
    DomainXMLError,
    GuestDefaults,
    NetSpec,
    OsinfoId,
    defaults_from_guest,
    domain_uuid,
    osinfo_for,
    render_domain,
    target_dev_for,
    validate_domain_file,
    validate_domain_xml,
)
from vmcraft_tasks.outputs import write_domain_xml

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = [
    "debian12-bios-1disk",
    "rocky9-uefi-2disks",
    "windows2019-uefi",
    "almalinux8-virtio-initramfs",
    "debian11-custom-kernel-no-virtio",
    "rhel8-uefi-sata-virtio-net",
    "windows2022-uefi-no-virtio",
    "windows2016-bios-viostor-netkvm",
]
REGEN = os.environ.get("VMCRAFT_REGEN_GOLDEN") == "1"

DEBIAN12 = OSInfo(root_partition=1, type="linux", distro="debian", major=12, minor=0).to_dict()
WIN2019 = OSInfo(
    root_partition=2,
    type="windows",
    distro="windows",
    product_name="Windows Server 2019 Standard",
    major=10,
    minor=0,
    arch="x86_64",
    build="17763",
    edition="ServerStandard",
).to_dict()


VIRTIO = GuestCaps("virtio", "virtio", True, True, evidence=("drivers seen",))
SATA_ONLY = GuestCaps(
    "sata", "virtio", False, True, reasons=("kernel 1: virtio_blk missing: disks on SATA",)
)
G = f"{{{GUESTCAPS_NS}}}"


def caps_from_case(data: dict[str, Any]) -> GuestCaps | None:
    if "kernels" in data:
        return linux_caps([KernelDrivers.from_dict(k) for k in data["kernels"]])
    if "windows_drivers" in data:
        return windows_caps(WindowsDrivers.from_dict(data["windows_drivers"]))
    if "guestcaps" in data:
        return GuestCaps.from_dict(data["guestcaps"])
    return None


def spec_from_case(data: dict[str, Any]) -> DomainSpec:
    """The pipeline's path: caller facts -> DomainSpec -> guest defaults applied."""
    spec = DomainSpec(
        name=data["name"],
        memory_mib=data["memory_mib"],
        vcpus=data["vcpus"],
        disks=[DiskSpec(**d) for d in data["disks"]],
        networks=[NetSpec(**n) for n in data["networks"]],
        os_info=data["os_info"],
    )
    caps = caps_from_case(data)
    return defaults_from_guest(data["os_info"], data["has_esp"], caps).apply(spec)


def make_spec(**overrides: Any) -> DomainSpec:
    fields: dict[str, Any] = {
        "name": "vm1",
        "memory_mib": 1024,
        "vcpus": 1,
        "disks": [DiskSpec("/images/vm1.qcow2", "qcow2", "vda")],
        "networks": [NetSpec()],
    }
    fields.update(overrides)
    return DomainSpec(**fields)


def parse(xml_text: str) -> ET.Element:
    return ET.fromstring(xml_text)


# --- golden files ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    data = json.loads((GOLDEN / f"{case}-in.json").read_text())
    rendered = render_domain(spec_from_case(data))
    out = GOLDEN / f"{case}-out.xml"
    if REGEN:
        out.write_text(rendered)
    assert out.exists(), f"{out} missing: run with VMCRAFT_REGEN_GOLDEN=1 to create it"
    assert rendered == out.read_text(), (
        f"{case}: output differs from {out.name}; if intended, regenerate with "
        "VMCRAFT_REGEN_GOLDEN=1 and review the diff"
    )
    validate_domain_file(str(out))


def test_golden_cases_cover_every_input_file() -> None:
    inputs = sorted(p.name.removesuffix("-in.json") for p in GOLDEN.glob("*-in.json"))
    assert inputs == sorted(CASES)


@pytest.mark.parametrize(
    ("case", "bus", "model"),
    [
        ("debian12-bios-1disk", "virtio", "virtio"),
        ("rocky9-uefi-2disks", "virtio", "virtio"),
        ("windows2019-uefi", "virtio", "virtio"),
        ("almalinux8-virtio-initramfs", "virtio", "virtio"),
        ("debian11-custom-kernel-no-virtio", "sata", "e1000e"),
        ("rhel8-uefi-sata-virtio-net", "sata", "virtio"),
        ("windows2022-uefi-no-virtio", "sata", "e1000e"),
        ("windows2016-bios-viostor-netkvm", "virtio", "virtio"),
    ],
)
def test_golden_devices_follow_the_caps(case: str, bus: str, model: str) -> None:
    """What each golden file is for, stated apart from the (regenerable) output."""
    root = parse((GOLDEN / f"{case}-out.xml").read_text())
    prefix = {"virtio": "vd", "sata": "sd"}[bus]
    for target in root.findall("devices/disk/target"):
        assert target.get("bus") == bus
        assert (target.get("dev") or "").startswith(prefix)
    assert {m.get("type") for m in root.findall("devices/interface/model")} == {model}
    caps = root.find(f"metadata/{G}guestcaps")
    assert caps is not None
    block, net = caps.find(f"{G}block"), caps.find(f"{G}net")
    assert block is not None and net is not None
    assert (block.get("bus"), net.get("model")) == (bus, model)
    # Every compatibility-mode choice is explained in the XML itself.
    reasons = [r.text or "" for r in caps.findall(f"{G}reason")]
    assert any("SATA" in r for r in reasons) == (bus == "sata")
    assert any("e1000e" in r for r in reasons) == (model == "e1000e")


def test_rendering_is_deterministic() -> None:
    data = json.loads((GOLDEN / "rocky9-uefi-2disks-in.json").read_text())
    assert render_domain(spec_from_case(data)) == render_domain(spec_from_case(data))


# --- rendering details ----------------------------------------------------------------


def test_bios_domain_has_no_firmware_and_no_smm() -> None:
    root = parse(render_domain(make_spec()))
    assert root.get("type") == "kvm"
    os_el = root.find("os")
    assert os_el is not None
    assert "firmware" not in os_el.attrib
    assert os_el.find("firmware") is None
    assert root.find("features/smm") is None
    os_type = root.find("os/type")
    assert os_type is not None
    assert (os_type.get("arch"), os_type.get("machine"), os_type.text) == ("x86_64", "q35", "hvm")


def test_uefi_domain_asks_for_efi_firmware_with_smm() -> None:
    root = parse(render_domain(make_spec(uefi=True)))
    os_el = root.find("os")
    assert os_el is not None
    assert os_el.get("firmware") == "efi"
    feature = root.find("os/firmware/feature")
    assert feature is not None
    assert feature.attrib == {"enabled": "no", "name": "secure-boot"}
    smm = root.find("features/smm")
    assert smm is not None
    assert smm.get("state") == "on"


def test_top_level_order_is_fixed() -> None:
    root = parse(render_domain(make_spec(os_info=DEBIAN12)))
    assert [child.tag for child in root] == [
        "name",
        "uuid",
        "metadata",
        "memory",
        "currentMemory",
        "vcpu",
        "os",
        "features",
        "cpu",
        "clock",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "pm",
        "devices",
    ]


def test_device_order_and_no_emulator() -> None:
    spec = make_spec(
        disks=[DiskSpec("/i/a.qcow2", "qcow2", "vda"), DiskSpec("/i/b.raw", "raw", "vdb")],
        networks=[NetSpec(), NetSpec(network="backend")],
    )
    devices = parse(render_domain(spec)).find("devices")
    assert devices is not None
    assert [d.tag for d in devices] == [
        "disk",
        "disk",
        "interface",
        "interface",
        "serial",
        "console",
        "channel",
        "graphics",
        "video",
        "memballoon",
        "rng",
    ]


def test_memory_is_in_kib() -> None:
    root = parse(render_domain(make_spec(memory_mib=3072, vcpus=3)))
    for tag in ("memory", "currentMemory"):
        el = root.find(tag)
        assert el is not None
        assert (el.get("unit"), el.text) == ("KiB", str(3072 * 1024))
    vcpu = root.find("vcpu")
    assert vcpu is not None
    assert vcpu.text == "3"


def test_disk_element() -> None:
    spec = make_spec(disks=[DiskSpec("/i/b.raw", "raw", "vdb")])
    disk = parse(render_domain(spec)).find("devices/disk")
    assert disk is not None
    driver, source, target = disk.find("driver"), disk.find("source"), disk.find("target")
    assert driver is not None and source is not None and target is not None
    assert (driver.get("name"), driver.get("type")) == ("qemu", "raw")
    assert source.get("file") == "/i/b.raw"
    assert target.attrib == {"dev": "vdb", "bus": "virtio"}


def test_interface_mac_is_written_only_when_known() -> None:
    spec = make_spec(networks=[NetSpec(mac="52:54:00:aa:bb:cc"), NetSpec(network="lan")])
    first, second = parse(render_domain(spec)).findall("devices/interface")
    mac = first.find("mac")
    assert mac is not None
    assert mac.get("address") == "52:54:00:aa:bb:cc"
    assert second.find("mac") is None
    source, model = second.find("source"), second.find("model")
    assert source is not None and model is not None
    assert (source.get("network"), model.get("type")) == ("lan", "virtio")


def test_uuid_is_stable_per_name() -> None:
    assert domain_uuid("web01") == domain_uuid("web01")
    assert domain_uuid("web01") != domain_uuid("web02")
    uuid_el = parse(render_domain(make_spec(name="web01"))).find("uuid")
    assert uuid_el is not None
    assert uuid_el.text == domain_uuid("web01")


def test_libosinfo_metadata_for_a_known_os() -> None:
    xml_text = render_domain(make_spec(os_info=DEBIAN12))
    assert f'<libosinfo:libosinfo xmlns:libosinfo="{LIBOSINFO_NS}">' in xml_text
    root = parse(xml_text)
    os_el = root.find(f"metadata/{{{LIBOSINFO_NS}}}libosinfo/{{{LIBOSINFO_NS}}}os")
    assert os_el is not None
    assert os_el.get("id") == "http://debian.org/debian/12"


@pytest.mark.parametrize(
    "os_info",
    [None, {}, OSInfo(root_partition=1, type="unknown").to_dict()],
    ids=["none", "empty", "unknown"],
)
def test_no_metadata_when_os_is_not_mapped(os_info: dict[str, Any] | None) -> None:
    xml_text = render_domain(make_spec(os_info=os_info))
    assert "<metadata" not in xml_text
    assert "libosinfo" not in xml_text


def test_special_characters_in_name_are_escaped_and_valid() -> None:
    xml_text = render_domain(make_spec(name='db & "app" <1>'))
    name = parse(xml_text).find("name")
    assert name is not None
    assert name.text == 'db & "app" <1>'
    assert "&amp;" in xml_text
    validate_domain_xml(xml_text)


def test_windows_gets_hyperv_localtime_and_vga() -> None:
    spec = defaults_from_guest(WIN2019, has_esp=False, caps=VIRTIO).apply(
        make_spec(os_info=WIN2019)
    )
    root = parse(render_domain(spec))
    assert root.find("features/hyperv/relaxed") is not None
    clock = root.find("clock")
    assert clock is not None
    assert clock.get("offset") == "localtime"
    assert root.find("clock/timer[@name='hypervclock']") is not None
    model = root.find("devices/video/model")
    assert model is not None
    assert model.get("type") == "vga"


def test_linux_gets_no_hyperv_and_utc() -> None:
    spec = defaults_from_guest(DEBIAN12, has_esp=False, caps=VIRTIO).apply(
        make_spec(os_info=DEBIAN12)
    )
    root = parse(render_domain(spec))
    assert root.find("features/hyperv") is None
    clock = root.find("clock")
    assert clock is not None
    assert clock.get("offset") == "utc"


# --- defaults from the guest ----------------------------------------------------------


@pytest.mark.parametrize("has_esp", [True, False])
def test_uefi_follows_the_esp(has_esp: bool) -> None:
    defaults = defaults_from_guest(DEBIAN12, has_esp=has_esp, caps=VIRTIO)
    assert defaults.uefi is has_esp
    assert (defaults.machine, defaults.disk_bus, defaults.net_model) == ("q35", "virtio", "virtio")


@pytest.mark.parametrize("os_info", [DEBIAN12, WIN2019], ids=["linux", "windows"])
def test_devices_come_from_the_caps_not_the_os(os_info: dict[str, Any]) -> None:
    for caps in (VIRTIO, SATA_ONLY, CAPS_UNKNOWN):
        defaults = defaults_from_guest(os_info, has_esp=True, caps=caps)
        assert (defaults.disk_bus, defaults.net_model) == (caps.block_bus, caps.net_model)
        assert defaults.caps is caps


def test_windows_keeps_its_os_defaults_whatever_the_caps() -> None:
    defaults = defaults_from_guest(WIN2019, has_esp=True, caps=VIRTIO)
    assert defaults == GuestDefaults(
        uefi=True, caps=VIRTIO, hyperv=True, clock_offset="localtime", video_model="vga"
    )


def test_without_caps_the_guest_gets_compatibility_devices() -> None:
    defaults = defaults_from_guest(WIN2019, has_esp=True)
    assert defaults.caps == CAPS_UNKNOWN
    assert (defaults.disk_bus, defaults.net_model) == ("sata", "e1000e")


def test_no_os_found_still_gives_defaults() -> None:
    assert defaults_from_guest(None, has_esp=False) == GuestDefaults(uefi=False)
    assert GuestDefaults(uefi=False).caps == CAPS_UNKNOWN


@pytest.mark.parametrize(
    ("arch", "want"), [("x86_64", "x86_64"), ("i386", "i686"), (None, "x86_64")]
)
def test_arch_mapping(arch: str | None, want: str) -> None:
    os_info = {**DEBIAN12, "arch": arch}
    assert defaults_from_guest(os_info, has_esp=False).arch == want


def test_non_x86_guest_is_refused() -> None:
    with pytest.raises(DomainSpecError, match="aarch64"):
        defaults_from_guest({**DEBIAN12, "arch": "aarch64"}, has_esp=True)


def test_apply_overrides_guest_choices_and_keeps_the_rest() -> None:
    spec = make_spec(
        disks=[DiskSpec("/i/a.qcow2", "qcow2", "vda")],
        networks=[NetSpec(network="lan", model="e1000", mac="52:54:00:00:00:01")],
        notes=("from caller",),
    )
    applied = defaults_from_guest(WIN2019, has_esp=True, caps=VIRTIO).apply(spec)
    assert applied.uefi and applied.hyperv
    assert applied.networks == [NetSpec(network="lan", model="virtio", mac="52:54:00:00:00:01")]
    assert applied.disks == spec.disks
    assert (applied.name, applied.memory_mib, applied.vcpus) == ("vm1", 1024, 1)
    assert applied.notes == ("from caller",)
    assert applied.guestcaps is VIRTIO


def test_sata_disks_are_renamed_sdx_and_back() -> None:
    spec = make_spec(
        disks=[DiskSpec("/i/a.qcow2", "qcow2", "vda"), DiskSpec("/i/b.raw", "raw", "vdc")]
    )
    sata = defaults_from_guest(DEBIAN12, has_esp=False, caps=SATA_ONLY).apply(spec)
    assert [(d.bus, d.target_dev) for d in sata.disks] == [("sata", "sda"), ("sata", "sdc")]
    assert [n.model for n in sata.networks] == ["virtio"]
    # Applying other caps replaces the first choice entirely, targets included.
    back = defaults_from_guest(DEBIAN12, has_esp=False, caps=VIRTIO).apply(sata)
    assert back.disks == spec.disks
    assert back.guestcaps is VIRTIO


def test_target_dev_for() -> None:
    assert target_dev_for("sata", "vdb") == "sdb"
    assert target_dev_for("virtio", "sdaa") == "vdaa"
    assert target_dev_for("virtio", "vda") == "vda"
    with pytest.raises(DomainSpecError, match="target"):
        target_dev_for("sata", "hda")


# --- guestcaps metadata ---------------------------------------------------------------


def test_guestcaps_metadata_explains_compatibility_mode() -> None:
    caps = GuestCaps.compatibility(
        "no boot-start virtio-blk driver: disks on SATA",
        "no virtio-net driver: NIC is e1000e",
        evidence=("ControlSet001\\Services: viostor service not registered",),
    )
    spec = defaults_from_guest(WIN2019, has_esp=True, caps=caps).apply(make_spec(os_info=WIN2019))
    xml_text = render_domain(spec)
    assert f'<vmcraft:guestcaps xmlns:vmcraft="{GUESTCAPS_NS}">' in xml_text
    root = parse(xml_text)
    metadata = root.find("metadata")
    assert metadata is not None
    # libosinfo first, then ours: both kept, each in its own namespace.
    assert [child.tag for child in metadata] == [f"{{{LIBOSINFO_NS}}}libosinfo", f"{G}guestcaps"]
    block = metadata.find(f"{G}guestcaps/{G}block")
    net = metadata.find(f"{G}guestcaps/{G}net")
    assert block is not None and net is not None
    assert block.attrib == {"bus": "sata", "virtio": "no"}
    assert net.attrib == {"model": "e1000e", "virtio": "no"}
    reasons = [r.text for r in metadata.findall(f"{G}guestcaps/{G}reason")]
    assert reasons == list(caps.reasons)
    evidence = [e.text for e in metadata.findall(f"{G}guestcaps/{G}evidence")]
    assert evidence == list(caps.evidence)
    target = root.find("devices/disk/target")
    assert target is not None
    assert target.attrib == {"dev": "sda", "bus": "sata"}
    validate_domain_xml(xml_text)


def test_guestcaps_metadata_without_libosinfo() -> None:
    spec = defaults_from_guest(None, has_esp=False).apply(make_spec())
    root = parse(render_domain(spec))
    metadata = root.find("metadata")
    assert metadata is not None
    assert [child.tag for child in metadata] == [f"{G}guestcaps"]
    reason = metadata.find(f"{G}guestcaps/{G}reason")
    assert reason is not None
    assert reason.text == CAPS_UNKNOWN_REASON


# --- write_domain_xml ---------------------------------------------------------------


def migrated_vm(tmp_path: Path) -> dict[str, Any]:
    return {
        "id": "web01",
        "target_format": "qcow2",
        "disks": [{"target": "/images/web01-vda.qcow2"}, {"target": "/images/web01-vdb.qcow2"}],
        "memory_mib": 2048,
        "vcpus": 2,
        "network": "lan",
        "output_dir": str(tmp_path / "out"),
        "output_root": str(tmp_path),
    }


def test_write_domain_xml_uses_the_reported_caps(tmp_path: Path) -> None:
    report = {
        "roots": [DEBIAN12],
        "partitions": [{"number": 1, "type": "ef"}],
        "guestcaps": VIRTIO.to_dict(),
    }
    path = write_domain_xml(migrated_vm(tmp_path), report)
    assert path == str(tmp_path / "out" / "web01.xml")
    root = parse(Path(path).read_text())
    targets = [t.attrib for t in root.findall("devices/disk/target")]
    assert targets == [{"dev": "vda", "bus": "virtio"}, {"dev": "vdb", "bus": "virtio"}]
    model = root.find("devices/interface/model")
    assert model is not None
    assert model.get("type") == "virtio"
    os_el = root.find("os")
    assert os_el is not None
    assert os_el.get("firmware") == "efi"
    validate_domain_file(path)


@pytest.mark.parametrize(
    ("guestcaps", "reason"),
    [
        (None, "capabilities unknown"),
        ({"block_bus": "virtio"}, "unreadable"),
    ],
    ids=["absent", "malformed"],
)
def test_write_domain_xml_without_usable_caps_is_compatibility_mode(
    tmp_path: Path, guestcaps: dict[str, Any] | None, reason: str
) -> None:
    report: dict[str, Any] = {"roots": [WIN2019], "partitions": []}
    if guestcaps is not None:
        report["guestcaps"] = guestcaps
    root = parse(Path(write_domain_xml(migrated_vm(tmp_path), report)).read_text())
    targets = [t.attrib for t in root.findall("devices/disk/target")]
    assert targets == [{"dev": "sda", "bus": "sata"}, {"dev": "sdb", "bus": "sata"}]
    model = root.find("devices/interface/model")
    assert model is not None
    assert model.get("type") == "e1000e"
    reasons = [r.text or "" for r in root.findall(f"metadata/{G}guestcaps/{G}reason")]
    assert len(reasons) == 1
    assert reason in reasons[0]


# --- libosinfo ids ----------------------------------------------------------------------


def linux(distro: str, major: int | None, minor: int | None = None) -> dict[str, Any]:
    return OSInfo(root_partition=1, type="linux", distro=distro, major=major, minor=minor).to_dict()


def windows(product: str, build: str | None, edition: str | None = None) -> dict[str, Any]:
    return OSInfo(
        root_partition=1,
        type="windows",
        distro="windows",
        product_name=product,
        major=10,
        minor=0,
        build=build,
        edition=edition,
    ).to_dict()


@pytest.mark.parametrize(
    ("os_info", "want"),
    [
        (linux("debian", 12, 0), ("debian12", "http://debian.org/debian/12")),
        (linux("debian", 11), ("debian11", "http://debian.org/debian/11")),
        (linux("ubuntu", 22, 4), ("ubuntu22.04", "http://ubuntu.com/ubuntu/22.04")),
        (linux("rhel", 9, 3), ("rhel9.3", "http://redhat.com/rhel/9.3")),
        (linux("rocky", 9, 3), ("rocky9", "http://rockylinux.org/rocky/9")),
        (linux("almalinux", 8, 9), ("almalinux8", "http://almalinux.org/almalinux/8")),
        (
            windows("Windows Server 2019 Standard", "17763"),
            ("win2k19", "http://microsoft.com/win/2k19"),
        ),
        (
            windows("Windows Server 2022 Datacenter", None),
            ("win2k22", "http://microsoft.com/win/2k22"),
        ),
        (
            windows("Windows Server 2012 R2 Standard", None),
            ("win2k12r2", "http://microsoft.com/win/2k12r2"),
        ),
        # No year in ProductName: the build still identifies the release.
        (
            windows("Windows Server Datacenter", "14393", "ServerDatacenter"),
            ("win2k16", "http://microsoft.com/win/2k16"),
        ),
        (windows("Windows 10 Pro", "19045"), ("win10", "http://microsoft.com/win/10")),
        # Windows 11 calls itself "Windows 10" in the registry.
        (windows("Windows 10 Pro", "22631"), ("win11", "http://microsoft.com/win/11")),
    ],
)
def test_osinfo_known(os_info: dict[str, Any], want: tuple[str, str]) -> None:
    assert osinfo_for(os_info) == OsinfoId(*want)


@pytest.mark.parametrize(
    "os_info",
    [
        None,
        linux("debian", 99),
        linux("debian", None),
        linux("ubuntu", 23, 10),  # not an LTS: not mapped
        linux("rhel", 9, None),  # osinfo has per-minor RHEL entries only
        linux("gentoo", 2),
        windows("Windows Server 2025", "26100", "ServerStandard"),
        OSInfo(root_partition=1, type="unknown").to_dict(),
    ],
)
def test_osinfo_unknown(os_info: dict[str, Any] | None) -> None:
    assert osinfo_for(os_info) is None


# --- spec checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DiskSpec("images/a.qcow2", "qcow2", "vda"), "absolute"),
        (lambda: DiskSpec("/a.vmdk", "vmdk", "vda"), "format"),  # type: ignore[arg-type]
        (lambda: DiskSpec("/a.raw", "raw", "hda1"), "target"),
        (lambda: NetSpec(mac="52:54:00:AA:BB:CC"), "MAC"),
        (lambda: NetSpec(mac="52-54-00-aa-bb-cc"), "MAC"),
        (lambda: NetSpec(mac="01:00:5e:00:00:01"), "multicast"),
        (lambda: make_spec(name="a/b"), "name"),
        (lambda: make_spec(name=""), "name"),
        (lambda: make_spec(memory_mib=0), "positive"),
        (lambda: make_spec(vcpus=-1), "positive"),
        (lambda: make_spec(disks=[]), "no disks"),
        (
            lambda: make_spec(
                disks=[DiskSpec("/a.raw", "raw", "vda"), DiskSpec("/b.raw", "raw", "vda")]
            ),
            "twice",
        ),
        (lambda: make_spec(disks=[DiskSpec("/a.raw", "raw", "sda")]), "vd"),
        (lambda: make_spec(disks=[DiskSpec("/a.raw", "raw", "vda", bus="sata")]), "sd"),
        (
            lambda: make_spec(
                networks=[NetSpec(mac="52:54:00:00:00:01"), NetSpec(mac="52:54:00:00:00:01")]
            ),
            "same MAC",
        ),
    ],
)
def test_bad_specs_are_refused(make: Any, match: str) -> None:
    with pytest.raises(DomainSpecError, match=match):
        make()


def test_spec_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        DiskSpec("relative", "raw", "vda")


# --- validation -------------------------------------------------------------------------


def test_validation_runs_virt_xml_validate_through_the_command_runner() -> None:
    seen: list[list[str]] = []
    remove = commands.add_observer(lambda argv: seen.append(list(argv)))
    try:
        validate_domain_xml(render_domain(make_spec()))
    finally:
        remove()
    assert len(seen) == 1
    assert seen[0][0] == "virt-xml-validate"
    assert seen[0][2] == "domain"


def test_validation_rejects_a_broken_domain() -> None:
    broken = render_domain(make_spec()).replace("<on_crash>destroy", "<on_crash>explode")
    with pytest.raises(DomainXMLError, match="not a valid libvirt domain"):
        validate_domain_xml(broken)


def test_validation_temp_file_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    validate_domain_xml(render_domain(make_spec()))
    assert list(tmp_path.iterdir()) == []


def test_missing_xmllint_reads_as_a_setup_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(argv: list[str], **_: Any) -> Any:
        raise CommandError(argv, 127, "/usr/bin/virt-xml-validate: 144: xmllint: not found")

    monkeypatch.setattr(commands, "run", fake_run)
    with pytest.raises(DomainXMLError, match="cannot run") as info:
        validate_domain_file("/nonexistent.xml")
    assert "xmllint" in info.value.detail
