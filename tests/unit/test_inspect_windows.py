"""Windows inspection with real (tiny) registry hives built by vmcraft_tasks/samples/hive.py."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import InspectError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect import OSInfo, inspect_root, looks_like_os_root
from vmcraft_tasks.craft.inspect.windows import (
    find_systemroot,
    parse_hivexget_key,
    windows_version_from_values,
)
from vmcraft_tasks.samples.hive import (
    build_empty_hive,
    hivexsh_script,
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
