"""ELF/PE architecture parsing and the guest binary probe."""

from __future__ import annotations

import platform
import struct
from pathlib import Path

import pytest

from vmcraft_tasks.craft.errors import InspectError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.arch import detect_linux_arch, parse_elf_arch, parse_pe_arch

# uname -m of this host mapped to what parse_elf_arch reports for its binaries.
HOST_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "i686": "i386"}.get(
    platform.machine().lower(), platform.machine()
)


def elf_header(machine: int, *, is64: bool = True, little: bool = True) -> bytes:
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    order = "<" if little else ">"
    return ident + struct.pack(f"{order}HHI", 2, machine, 1) + b"\0" * 40


def pe_header(machine: int, pe_offset: int = 0x80) -> bytes:
    data = bytearray(b"MZ" + b"\0" * (pe_offset - 2))
    struct.pack_into("<I", data, 0x3C, pe_offset)
    return bytes(data) + b"PE\0\0" + struct.pack("<H", machine) + b"\0" * 20


def test_real_host_binary() -> None:
    header = Path("/usr/bin/true").read_bytes()[:64]
    assert parse_elf_arch(header) == HOST_ARCH


@pytest.mark.parametrize(
    ("machine", "is64", "little", "expected"),
    [
        (62, True, True, "x86_64"),
        (3, False, True, "i386"),
        (183, True, True, "aarch64"),
        (40, False, True, "armv7l"),
        (21, True, True, "ppc64le"),
        (21, True, False, "ppc64"),
        (20, False, False, "ppc"),
        (22, True, False, "s390x"),
        (22, False, False, "s390"),
        (243, True, True, "riscv64"),
        (243, False, True, "riscv32"),
        (8, True, True, "mips64el"),
        (8, False, False, "mips"),
        (258, True, True, "loongarch64"),
        (43, True, False, "sparc64"),
    ],
)
def test_handmade_elf_headers(machine: int, is64: bool, little: bool, expected: str) -> None:
    assert parse_elf_arch(elf_header(machine, is64=is64, little=little)) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"#!/bin/sh\necho hi\n" + b"\0" * 10, "not an ELF"),
        (b"\x7fELF", "not an ELF"),
        (b"\x7fELF" + bytes([3, 1]) + b"\0" * 20, "bad ELF identification"),
        (elf_header(0xBEEF), "unknown ELF machine"),
    ],
)
def test_bad_elf_is_an_inspect_error(data: bytes, message: str) -> None:
    with pytest.raises(InspectError, match=message):
        parse_elf_arch(data)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [(0x8664, "x86_64"), (0x14C, "i386"), (0xAA64, "aarch64"), (0x1C4, "armv7l")],
)
def test_pe_headers(machine: int, expected: str) -> None:
    assert parse_pe_arch(pe_header(machine)) == expected


def test_bad_pe_is_an_inspect_error() -> None:
    with pytest.raises(InspectError, match="no MZ"):
        parse_pe_arch(elf_header(62))
    with pytest.raises(InspectError, match="no PE signature"):
        parse_pe_arch(b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40) + b"NE\0\0" + b"\0" * 8)
    with pytest.raises(InspectError, match="beyond"):
        parse_pe_arch(pe_header(0x8664)[:0x60])
    with pytest.raises(InspectError, match="unknown PE machine"):
        parse_pe_arch(pe_header(0x1234))


def _guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "usr" / "bin").mkdir(parents=True)
    return root


def test_detect_follows_usrmerge_symlink(tmp_path: Path) -> None:
    root = _guest(tmp_path)
    (root / "usr" / "bin" / "ls").write_bytes(Path("/usr/bin/true").read_bytes()[:4096])
    (root / "bin").symlink_to("usr/bin")
    fs = GuestFS(str(root))
    assert detect_linux_arch(fs, ("/bin/ls",)) == HOST_ARCH
    assert detect_linux_arch(fs) == HOST_ARCH


def test_detect_follows_absolute_guest_symlink(tmp_path: Path) -> None:
    root = _guest(tmp_path)
    (root / "usr" / "bin" / "dash").write_bytes(elf_header(183))
    (root / "bin").mkdir()
    (root / "bin" / "sh").symlink_to("/usr/bin/dash")
    assert detect_linux_arch(GuestFS(str(root))) == "aarch64"


def test_detect_skips_scripts_and_never_reads_host_binaries(tmp_path: Path) -> None:
    root = _guest(tmp_path)
    (root / "usr" / "bin" / "ls").write_text("#!/bin/sh\n")
    (root / "bin").mkdir()
    # On the host this target is a real ELF; inside the guest it does not exist.
    (root / "bin" / "sh").symlink_to("/usr/bin/true")
    assert detect_linux_arch(GuestFS(str(root))) is None
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd" / "systemd").write_bytes(elf_header(22, little=False))
    assert detect_linux_arch(GuestFS(str(root))) == "s390x"
