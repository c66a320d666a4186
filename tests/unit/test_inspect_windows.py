"""Windows inspection with real (tiny) registry hives built by vmcraft_tasks/samples/hive.py."""

from __future__ import annotations

import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import InspectError
from vmcraft_tasks.craft.guestcaps import WindowsDriver, windows_caps
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect import OSInfo, inspect_root, looks_like_os_root
from vmcraft_tasks.craft.inspect.windows import (
    find_systemroot,
    parse_hivexget_key,
    windows_driver_facts,
    windows_version_from_values,
)
from vmcraft_tasks.samples.hive import (
    RegValue,
    build_empty_hive,
    hivexsh_script,
    make_hive,
    make_software_hive,
    make_system_hive,
)

needs_hivex = pytest.mark.skipif(
    shutil.which("hivexget") is None or shutil.which("hivexsh") is None,
    reason="libhivex-bin (hivexget, hivexsh) is not installed",
)


def pe(machine: int = 0x8664) -> bytes:
    data = bytearray(b"MZ" + b"\0" * 0x7E)
    struct.pack_into("<I", data, 0x3C, 0x80)
    return bytes(data) + b"PE\0\0" + struct.pack("<H", machine) + b"\0" * 200


def windows_tree(
    root: Path,
    *,
    systemroot: str = "Windows",
    system32: str = "System32",
    config: str = "config",
) -> Path:
    sys32 = root / systemroot / system32
    (sys32 / config).mkdir(parents=True)
    (sys32 / "cmd.exe").write_bytes(pe())
    return sys32 / config


def inspect(root: Path, partition: int = 2) -> OSInfo | None:
    return inspect_root(str(root), root_partition=partition, filesystems=[], partitions=[])


@needs_hivex
def test_empty_hive_is_valid_for_hivex(tmp_path: Path) -> None:
    hive = tmp_path / "EMPTY"
    hive.write_bytes(build_empty_hive())
    assert len(hive.read_bytes()) == 8192
    listing = commands.run(["hivexsh", str(hive)], input_text="ls\nlsval\n")
    assert listing.stdout == ""
    # The root accepts children, which needs a valid sk cell.
    commands.run(["hivexsh", "-w", str(hive)], input_text=hivexsh_script({"A\\B": {"V": 7}}))
    out = commands.run(["hivexget", str(hive), "A\\B", "V"])
    assert out.stdout.strip() == "7"


@needs_hivex
def test_windows_server_2019(tmp_path: Path) -> None:
    root = tmp_path / "win"
    config = windows_tree(root)
    make_software_hive(config / "SOFTWARE")
    make_system_hive(config / "SYSTEM", computer_name="WIN-APP01")
    assert looks_like_os_root(str(root))
    info = inspect(root)
    assert info is not None
    assert (info.type, info.distro) == ("windows", "windows")
    assert info.product_name == "Windows Server 2019 Standard"
    assert (info.major, info.minor) == (10, 0)
    assert (info.build, info.edition) == ("17763", "ServerStandard")
    assert info.hostname == "WIN-APP01"
    assert info.arch == "x86_64"
    assert info.root_partition == 2
    assert info.notes == ()
    assert info.to_dict()["product_name"] == "Windows Server 2019 Standard"


@needs_hivex
def test_case_variants_and_old_version_scheme(tmp_path: Path) -> None:
    root = tmp_path / "win81"
    config = windows_tree(root, systemroot="WINDOWS", system32="system32", config="CONFIG")
    make_software_hive(
        config / "software",
        product_name="Windows 8.1 Pro",
        major=None,
        minor=None,
        build="9600",
        current_version="6.3",
        edition="Professional",
    )
    make_system_hive(config / "system", computer_name="DESKTOP-81")
    assert find_systemroot(GuestFS(str(root))) == "/WINDOWS"
    info = inspect(root)
    assert info is not None
    assert (info.product_name, info.major, info.minor) == ("Windows 8.1 Pro", 6, 3)
    assert info.hostname == "DESKTOP-81"


@needs_hivex
def test_winnt_systemroot(tmp_path: Path) -> None:
    root = tmp_path / "nt"
    config = windows_tree(root, systemroot="WINNT")
    make_software_hive(
        config / "SOFTWARE",
        product_name="Microsoft Windows 2000",
        major=None,
        minor=None,
        build="2195",
        current_version="5.0",
        edition="",
    )
    info = inspect(root)
    assert info is not None
    assert (info.product_name, info.major, info.minor, info.edition) == (
        "Microsoft Windows 2000",
        5,
        0,
        None,
    )
    assert info.hostname is None
    assert any(note.startswith("no SYSTEM hive") for note in info.notes)


def test_non_hive_software_gives_unknown_version_with_note(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    config = windows_tree(root)
    (config / "SOFTWARE").write_bytes(b"this is not a registry hive\n" * 400)
    info = inspect(root)
    assert info is not None
    assert info.type == "windows"
    assert (info.product_name, info.major, info.minor, info.build) == (None, None, None, None)
    assert info.arch == "x86_64"
    if shutil.which("hivexget"):
        assert any("SOFTWARE is not a valid registry hive" in n for n in info.notes)
    else:
        assert "hivexget is not installed, registry not read" in info.notes


def test_missing_hivexget_is_a_note_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "nohivex"
    config = windows_tree(root)
    (config / "SOFTWARE").write_bytes(b"regf")
    (config / "SYSTEM").write_bytes(b"regf")
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    info = inspect(root)
    assert info is not None
    assert info.major is None and info.hostname is None
    assert info.notes.count("hivexget is not installed, registry not read") == 2


@needs_hivex
def test_missing_key_and_non_pe_cmd(tmp_path: Path) -> None:
    root = tmp_path / "partial"
    config = windows_tree(root)
    (root / "Windows" / "System32" / "cmd.exe").write_bytes(b"\x7fELF not a PE")
    (config / "SOFTWARE").write_bytes(build_empty_hive())
    make_system_hive(config / "SYSTEM")
    info = inspect(root)
    assert info is not None
    assert info.major is None and info.arch is None
    assert info.hostname == "WIN-APP01"
    assert any("cannot read Microsoft\\Windows NT\\CurrentVersion" in n for n in info.notes)
    assert any(n.startswith("architecture unknown") for n in info.notes)


def test_windows_dir_without_cmd_is_unknown(tmp_path: Path) -> None:
    root = tmp_path / "recovery"
    (root / "windows" / "system32").mkdir(parents=True)
    assert looks_like_os_root(str(root))
    info = inspect(root)
    assert info is not None
    assert info.type == "unknown"
    assert info.notes == ("Windows directory found but no System32/cmd.exe",)


def test_parse_hivexget_key() -> None:
    text = (
        '"ProductName"="Windows \\"Server\\" C:\\\\x"\n'
        '"PathName"=str(2):"%SystemRoot%"\n'
        '"DigitalProductId"=hex(3):a4,00,00,00,03,00,00,00,30,00,\\\n  30,00\n'
        '"CurrentMajorVersionNumber"=dword:0000000a\n'
        '"Multi"="line one\nline two"\n'
        '@="default"\n'
    )
    values = parse_hivexget_key(text)
    assert values == {
        "productname": 'Windows "Server" C:\\x',
        "pathname": "%SystemRoot%",
        "currentmajorversionnumber": 10,
        "multi": "line one\nline two",
        "@": "default",
    }
    assert parse_hivexget_key("") == {}
    with pytest.raises(InspectError, match="unparseable"):
        parse_hivexget_key("garbage output\n")


def test_windows_version_from_values() -> None:
    modern = windows_version_from_values(
        {
            "productname": "Windows 11 Pro",
            "currentversion": "6.3",
            "currentmajorversionnumber": 10,
            "currentbuildnumber": "22631",
        }
    )
    assert (modern.major, modern.minor, modern.build) == (10, 0, "22631")
    legacy = windows_version_from_values({"currentversion": "6.1"})
    assert (legacy.major, legacy.minor, legacy.product_name) == (6, 1, None)
    assert windows_version_from_values({}).major is None


# --- virtio driver facts ----------------------------------------------------------------

BOOT, DEMAND = 0, 3
# An inbox service, so ControlSet001\Services exists even without any virtio driver.
STORAHCI: dict[str, RegValue] = {"Start": BOOT, "Type": 1}


def system_hive_with_services(
    path: Path,
    services: dict[str, dict[str, RegValue]],
    *,
    current: int | None = 1,
    control_set: int = 1,
) -> Path:
    keys: dict[str, dict[str, RegValue]] = {}
    if current is not None:
        keys["Select"] = {"Current": current, "Default": current}
    all_services: dict[str, dict[str, RegValue]] = {"storahci": STORAHCI, **services}
    for name, values in all_services.items():
        keys[f"ControlSet{control_set:03d}\\Services\\{name}"] = values
    return make_hive(path, keys, file_name="\\SystemRoot\\System32\\Config\\SYSTEM")


def driver_tree(tmp_path: Path, sys_files: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A Windows root with the given System32\\drivers files; (root, config dir)."""
    root = tmp_path / "win"
    config = windows_tree(root)
    drivers = root / "Windows" / "System32" / "drivers"
    drivers.mkdir()
    for name in sys_files:
        (drivers / name).write_bytes(b"MZ")
    return root, config


def facts_of(root: Path) -> dict[str, WindowsDriver]:
    facts = windows_driver_facts(GuestFS(str(root)))
    return {d.service: d for d in facts.drivers}


@needs_hivex
def test_viostor_boot_start_and_netkvm_are_found(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys", "netkvm.sys"))
    system_hive_with_services(
        config / "SYSTEM",
        {"viostor": {"Start": BOOT, "Type": 1}, "netkvm": {"Start": DEMAND, "Type": 1}},
    )
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.control_set == "ControlSet001"
    assert facts.notes == ()
    assert facts.drivers == (
        WindowsDriver("viostor", registered=True, start=BOOT, sys_file=True),
        WindowsDriver("vioscsi", registered=False, start=None, sys_file=False),
        WindowsDriver("netkvm", registered=True, start=DEMAND, sys_file=True),
    )
    caps = windows_caps(facts)
    assert (caps.block_bus, caps.net_model) == ("virtio", "virtio")


@needs_hivex
def test_demand_start_viostor_does_not_count(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys", "netkvm.sys"))
    system_hive_with_services(
        config / "SYSTEM",
        {"viostor": {"Start": DEMAND, "Type": 1}, "netkvm": {"Start": DEMAND, "Type": 1}},
    )
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.driver("viostor").start == DEMAND
    caps = windows_caps(facts)
    assert (caps.block_bus, caps.net_model) == ("sata", "virtio")
    assert "viostor service Start=3" in caps.reasons[0]


@needs_hivex
def test_registered_service_without_its_sys_file(tmp_path: Path) -> None:
    # An uninstalled driver often leaves its service key behind.
    root, config = driver_tree(tmp_path)
    system_hive_with_services(
        config / "SYSTEM",
        {"viostor": {"Start": BOOT, "Type": 1}, "netkvm": {"Start": DEMAND, "Type": 1}},
    )
    drivers = facts_of(root)
    assert drivers["viostor"] == WindowsDriver("viostor", True, BOOT, sys_file=False)
    assert drivers["netkvm"].sys_file is False
    caps = windows_caps(windows_driver_facts(GuestFS(str(root))))
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")
    assert "viostor.sys missing" in caps.reasons[0]
    assert "netkvm.sys missing" in caps.reasons[1]


@needs_hivex
def test_no_virtio_drivers_at_all(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path)
    system_hive_with_services(config / "SYSTEM", {})
    facts = windows_driver_facts(GuestFS(str(root)))
    # A missing service key is the ordinary "not installed", not a read problem.
    assert facts.notes == ()
    assert not any(d.registered for d in facts.drivers)
    caps = windows_caps(facts)
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")


@needs_hivex
def test_the_current_control_set_is_read(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys",))
    system_hive_with_services(
        config / "SYSTEM", {"viostor": {"Start": BOOT}}, current=2, control_set=2
    )
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.control_set == "ControlSet002"
    assert facts.driver("viostor").registered


@needs_hivex
def test_without_select_control_set_001_is_read(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys",))
    system_hive_with_services(config / "SYSTEM", {"viostor": {"Start": BOOT}}, current=None)
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.control_set == "ControlSet001"
    assert facts.driver("viostor").start == BOOT


@needs_hivex
def test_a_missing_control_set_is_noted(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path)
    # Select names ControlSet003, which does not exist.
    system_hive_with_services(config / "SYSTEM", {}, current=3)
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.control_set == "ControlSet003"
    assert len(facts.notes) == len(facts.drivers) == 3
    assert "ControlSet003" in facts.notes[0]


@needs_hivex
def test_driver_lookups_ignore_case(tmp_path: Path) -> None:
    root = tmp_path / "win"
    config = windows_tree(root, systemroot="WINDOWS", system32="system32", config="CONFIG")
    drivers = root / "WINDOWS" / "system32" / "DRIVERS"
    drivers.mkdir()
    (drivers / "VIOSTOR.SYS").write_bytes(b"MZ")
    (drivers / "NetKVM.sys").write_bytes(b"MZ")
    system_hive_with_services(
        config / "system", {"VioStor": {"Start": BOOT}, "NetKVM": {"Start": DEMAND}}
    )
    caps = windows_caps(windows_driver_facts(GuestFS(str(root))))
    assert (caps.block_bus, caps.net_model) == ("virtio", "virtio")


def test_fifo_hive_is_refused_without_running_hivexget(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys",))
    os.mkfifo(config / "SYSTEM")
    started = time.monotonic()
    with commands.recorded() as ran:
        facts = windows_driver_facts(GuestFS(str(root)))
    assert time.monotonic() - started < 5
    assert ran == []
    assert facts.control_set is None
    assert facts.notes == ("SYSTEM hive is a FIFO, not a regular file: not read",)
    caps = windows_caps(facts)
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")
    assert "FIFO" in caps.reasons[0]


@needs_hivex
def test_symlinked_hive_is_refused(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys",))
    real = system_hive_with_services(config / "SYSTEM.real", {"viostor": {"Start": BOOT}})
    (config / "SYSTEM").symlink_to(real.name)
    with commands.recorded() as ran:
        facts = windows_driver_facts(GuestFS(str(root)))
    assert ran == []
    assert facts.notes == ("SYSTEM hive is a symbolic link, not a regular file: not read",)


def test_hive_pointing_out_of_the_guest_is_refused(tmp_path: Path) -> None:
    host_hive = tmp_path / "host-SYSTEM"
    host_hive.write_bytes(build_empty_hive())
    root, config = driver_tree(tmp_path)
    (config / "SYSTEM").symlink_to(host_hive)
    with commands.recorded() as ran:
        facts = windows_driver_facts(GuestFS(str(root)))
    assert ran == []
    assert facts.control_set is None


def test_missing_system_hive(tmp_path: Path) -> None:
    root, _config = driver_tree(tmp_path)
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.control_set is None
    assert facts.notes[0].startswith("no SYSTEM hive")


def test_not_a_hive_is_one_note(tmp_path: Path) -> None:
    root, config = driver_tree(tmp_path)
    (config / "SYSTEM").write_bytes(b"this is not a registry hive\n" * 400)
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.control_set is None
    assert len(facts.notes) == 1
    if shutil.which("hivexget"):
        assert "SYSTEM is not a valid registry hive" in facts.notes[0]


def test_missing_hivexget_leaves_the_drivers_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, config = driver_tree(tmp_path, ("viostor.sys",))
    (config / "SYSTEM").write_bytes(b"regf")
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    facts = windows_driver_facts(GuestFS(str(root)))
    assert facts.notes == ("hivexget is not installed, registry not read",)
    assert windows_caps(facts).block_bus == "sata"


def test_not_windows(tmp_path: Path) -> None:
    facts = windows_driver_facts(GuestFS(str(tmp_path)))
    assert facts.control_set is None
    assert facts.notes == ("no Windows directory with System32/cmd.exe",)
