"""What a Windows system volume holds for inspection: registry hives and a PE cmd.exe."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import hive

# What the registry hives and cmd.exe of the sample Windows images say.
WINDOWS_FACTS: dict[str, Any] = {
    "product_name": "Windows Server 2019 Standard",
    "major": 10,
    "minor": 0,
    "build": "17763",
    "edition": "ServerStandard",
    "hostname": "WIN-APP01",
    "arch": "x86_64",
}
# Windows 10 / Server 2016 and later freeze CurrentVersion at 6.3 for old installers.
WINDOWS_CURRENT_VERSION = "6.3"
IMAGE_FILE_MACHINE_AMD64 = 0x8664
PE_OFFSET = 0x80
NTFS_FS_MIB = 64


def pe_stub(machine: int, text: bytes) -> bytes:
    """The headers of a PE executable: an MZ header whose e_lfanew (at 0x3c) points
    to "PE\\0\\0" and a COFF file header naming `machine`, followed by `text`.

    No sections and no optional header: enough for a header parser, not for a loader.
    """
    dos = bytearray(PE_OFFSET)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, PE_OFFSET)
    message = b"This program cannot be run in DOS mode.\r\r\n$"
    dos[0x4E : 0x4E + len(message)] = message
    # COFF header: machine, section count, timestamp, symbol table offset, symbol
    # count, optional header size, characteristics (EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE).
    coff = struct.pack("<HHIIIHH", machine, 0, 0, 0, 0, 0, 0x0022)
    return bytes(dos) + b"PE\0\0" + coff + text


def cmd_exe() -> bytes:
    return pe_stub(IMAGE_FILE_MACHINE_AMD64, b"dummy cmd.exe for vmcraft tests\n")


def windows_hives(work: Path) -> dict[str, bytes]:
    """Real registry hives (hivexsh -w on a hand-made empty hive) as {guest path: bytes}."""
    facts = WINDOWS_FACTS
    hive_dir = work / "hives"
    software = hive.make_software_hive(
        hive_dir / "SOFTWARE",
        product_name=facts["product_name"],
        major=facts["major"],
        minor=facts["minor"],
        build=facts["build"],
        current_version=WINDOWS_CURRENT_VERSION,
        edition=facts["edition"],
    )
    system = hive.make_system_hive(hive_dir / "SYSTEM", computer_name=facts["hostname"])
    ntuser = hive.make_hive(
        hive_dir / "NTUSER.DAT", {}, file_name="\\??\\C:\\Users\\Administrator\\ntuser.dat"
    )
    return {
        "/Windows/System32/config/SOFTWARE": software.read_bytes(),
        "/Windows/System32/config/SYSTEM": system.read_bytes(),
        "/Users/Administrator/NTUSER.DAT": ntuser.read_bytes(),
    }
