"""libvirt domain XML: golden files, guest-derived defaults, osinfo ids, spec checks.

Golden files live in tests/golden as <case>-in.json / <case>-out.xml. After an
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
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.libvirt import (
    LIBOSINFO_NS,
    WINDOWS_VIRTIO_NOTE,
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
    validate_domain_file,
    validate_domain_xml,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = ["debian12-bios-1disk", "rocky9-uefi-2disks", "windows2019-uefi"]
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
    return defaults_from_guest(data["os_info"], data["has_esp"]).apply(spec)


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
    spec = defaults_from_guest(WIN2019, has_esp=False).apply(make_spec(os_info=WIN2019))
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
    spec = defaults_from_guest(DEBIAN12, has_esp=False).apply(make_spec(os_info=DEBIAN12))
    root = parse(render_domain(spec))
    assert root.find("features/hyperv") is None
    clock = root.find("clock")
    assert clock is not None
    assert clock.get("offset") == "utc"


# --- defaults from the guest ----------------------------------------------------------


@pytest.mark.parametrize("has_esp", [True, False])
def test_uefi_follows_the_esp(has_esp: bool) -> None:
    defaults = defaults_from_guest(DEBIAN12, has_esp=has_esp)
    assert defaults.uefi is has_esp
    assert (defaults.machine, defaults.disk_bus, defaults.net_model) == ("q35", "virtio", "virtio")


def test_windows_defaults_use_virtio_and_note_the_drivers() -> None:
    defaults = defaults_from_guest(WIN2019, has_esp=True)
    assert defaults == GuestDefaults(
        uefi=True,
        disk_bus="virtio",
        net_model="virtio",
        hyperv=True,
        clock_offset="localtime",
        video_model="vga",
        notes=(WINDOWS_VIRTIO_NOTE,),
    )


def test_no_os_found_still_gives_defaults() -> None:
    assert defaults_from_guest(None, has_esp=False) == GuestDefaults(uefi=False)


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
    applied = defaults_from_guest(WIN2019, has_esp=True).apply(spec)
    assert applied.uefi and applied.hyperv
    assert applied.networks == [NetSpec(network="lan", model="virtio", mac="52:54:00:00:00:01")]
    assert applied.disks == spec.disks
    assert (applied.name, applied.memory_mib, applied.vcpus) == ("vm1", 1024, 1)
    assert applied.notes == ("from caller", WINDOWS_VIRTIO_NOTE)


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
