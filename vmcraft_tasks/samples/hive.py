"""Build small, valid Windows registry hives without a Windows machine.

Used by the sample Windows images (vmcraft_tasks.samples.windows) and by the
Windows inspection tests.

`build_empty_hive` writes the regf format from scratch: a 4096-byte base block with
its XOR checksum, then one 4096-byte hbin holding the root key's security (sk) cell,
the root nk cell and a free cell filling the rest of the bin. hivex refuses to add a
child key under a root without a valid sk cell, so the sk is not optional.

Keys and values are then added with `hivexsh -w` through the project's command
runner. (`hivexregedit --merge` would read a .reg file instead, but it ships in the
Perl bindings package, which is not installed here; hivexsh is in libhivex-bin.)
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

from vmcraft_tasks.craft import commands

BASE_BLOCK_SIZE = 4096
HBIN_SIZE = 4096
HBIN_HEADER_SIZE = 0x20
# Cell offsets in the format are relative to the first hbin, i.e. file offset - 4096.
SK_OFFSET = HBIN_HEADER_SIZE
NO_OFFSET = 0xFFFFFFFF
# 2020-01-01T00:00:00Z as a FILETIME (100 ns ticks since 1601), any fixed time will do.
FILETIME = 132223104000000000
# nk flags: KEY_HIVE_ENTRY (root) | KEY_NO_DELETE | KEY_COMP_NAME (ASCII name).
ROOT_NK_FLAGS = 0x0004 | 0x0008 | 0x0020

RegValue = str | int


def _cell(payload: bytes) -> bytes:
    # A cell's size counts its own 4-byte header, is a multiple of 8 and is stored
    # negated while the cell is in use.
    size = (4 + len(payload) + 7) & ~7
    return struct.pack("<i", -size) + payload.ljust(size - 4, b"\0")


def _security_descriptor() -> bytes:
    # Self-relative SECURITY_DESCRIPTOR: revision 1, control SE_SELF_RELATIVE, with no
    # owner, group, SACL or DACL. hivex only checks that the sk cell exists.
    return struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)


def _sk_cell() -> bytes:
    descriptor = _security_descriptor()
    # The sk list is circular; a single sk points at itself both ways. Refcount 1:
    # only the root key uses it (hivex increments it for each key it adds).
    payload = (
        b"sk" + struct.pack("<HIIII", 0, SK_OFFSET, SK_OFFSET, 1, len(descriptor)) + descriptor
    )
    return _cell(payload)


def _root_nk_cell(name: str) -> bytes:
    encoded = name.encode("ascii")
    payload = (
        b"nk"
        + struct.pack(
            "<HqIIIIIIIIIIHHIIIIHH",
            ROOT_NK_FLAGS,
            FILETIME,
            0,  # access bits
            NO_OFFSET,  # parent: the root has none
            0,  # subkeys
            0,  # volatile subkeys
            NO_OFFSET,  # subkey list
            NO_OFFSET,  # volatile subkey list
            0,  # values
            NO_OFFSET,  # value list
            SK_OFFSET,
            NO_OFFSET,  # class name
            0,  # largest subkey name length
            0,  # user/virtualisation flags
            0,  # largest subkey class name length
            0,  # largest value name length
            0,  # largest value data size
            0,  # work var
            len(encoded),
            0,  # class name length
        )
        + encoded
    )
    return _cell(payload)


def _checksum(base_block: bytes) -> int:
    # XOR of the first 127 little-endian dwords (bytes 0..0x1fb), as hivex verifies it.
    total = 0
    for (dword,) in struct.iter_unpack("<I", base_block[:0x1FC]):
        total ^= dword
    return total


def build_empty_hive(file_name: str = "", root_name: str = "ROOT") -> bytes:
    """Bytes of a valid hive holding only an empty root key."""
    sk = _sk_cell()
    nk = _root_nk_cell(root_name)
    root_offset = SK_OFFSET + len(sk)
    used = HBIN_HEADER_SIZE + len(sk) + len(nk)
    free = struct.pack("<i", HBIN_SIZE - used).ljust(HBIN_SIZE - used, b"\0")
    # hbin header: magic, offset of this bin, its size, 8 reserved bytes, timestamp, spare.
    hbin_header = b"hbin" + struct.pack("<IIIIqI", 0, HBIN_SIZE, 0, 0, FILETIME, 0)
    hbin = hbin_header + sk + nk + free
    assert len(hbin) == HBIN_SIZE

    base = bytearray(BASE_BLOCK_SIZE)
    struct.pack_into(
        "<4sIIqIIIIIII",
        base,
        0,
        b"regf",
        1,  # primary sequence number
        1,  # secondary sequence number: equal means the hive was cleanly written
        FILETIME,
        1,  # major version
        5,  # minor version (Windows XP and later write 3 or 5)
        0,  # file type: primary hive
        1,  # file format: direct memory load
        root_offset,
        HBIN_SIZE,  # size of all hbins
        1,  # clustering factor
    )
    encoded_name = file_name.encode("utf-16-le")[:64]
    base[0x30 : 0x30 + len(encoded_name)] = encoded_name
    struct.pack_into("<I", base, 0x1FC, _checksum(bytes(base)))
    return bytes(base) + hbin


def _value_line(value: RegValue) -> str:
    if isinstance(value, int):
        return f"dword:{value:#010x}"
    if not value.isascii() or "\n" in value:
        raise ValueError(f"hivexsh only takes one-line ASCII strings: {value!r}")
    return f"string:{value}"


def hivexsh_script(keys: Mapping[str, Mapping[str, RegValue]]) -> str:
    """A hivexsh script creating each backslash-separated key path with its values.

    Keys are created in the order given; a path may extend one created earlier.
    """
    lines: list[str] = []
    created: set[tuple[str, ...]] = set()
    for key_path, values in keys.items():
        parts = tuple(part for part in key_path.split("\\") if part)
        for depth in range(1, len(parts) + 1):
            if parts[:depth] not in created:
                lines.append(f"add {parts[depth - 1]}")
                created.add(parts[:depth])
            lines.append(f"cd {parts[depth - 1]}")
        if values:
            lines.append(f"setval {len(values)}")
            for name, value in values.items():
                lines.extend([name, _value_line(value)])
        # Walk back up with "cd ..": "cd \" trips hivexsh's line continuation.
        lines.extend(["cd .."] * len(parts))
    lines.append("commit")
    return "\n".join(lines) + "\n"


def add_keys(path: str | Path, keys: Mapping[str, Mapping[str, RegValue]]) -> None:
    """Add keys and values to the hive at `path` (hivexsh stops at the first error)."""
    commands.run(["hivexsh", "-w", str(path)], input_text=hivexsh_script(keys), timeout=30)


def make_hive(
    path: str | Path, keys: Mapping[str, Mapping[str, RegValue]], *, file_name: str = ""
) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(build_empty_hive(file_name))
    if keys:
        add_keys(target, keys)
    return target


def make_software_hive(
    path: str | Path,
    *,
    product_name: str = "Windows Server 2019 Standard",
    major: int | None = 10,
    minor: int | None = 0,
    build: str = "17763",
    current_version: str = "6.3",
    edition: str = "ServerStandard",
) -> Path:
    """A SOFTWARE hive with Microsoft\\Windows NT\\CurrentVersion filled in.

    major/minor None leaves out CurrentMajor/MinorVersionNumber, as on Windows 8.1
    and Server 2012 R2 and older.
    """
    values: dict[str, RegValue] = {
        "ProductName": product_name,
        "CurrentVersion": current_version,
        "CurrentBuildNumber": build,
        "EditionID": edition,
    }
    if major is not None:
        values["CurrentMajorVersionNumber"] = major
    if minor is not None:
        values["CurrentMinorVersionNumber"] = minor
    return make_hive(
        path,
        {"Microsoft\\Windows NT\\CurrentVersion": values},
        file_name="\\SystemRoot\\System32\\Config\\SOFTWARE",
    )


def make_system_hive(path: str | Path, computer_name: str = "WIN-APP01") -> Path:
    """A SYSTEM hive whose current control set names the computer."""
    return make_hive(
        path,
        {
            "Select": {"Current": 1, "Default": 1},
            "ControlSet001\\Control\\ComputerName\\ComputerName": {"ComputerName": computer_name},
        },
        file_name="\\SystemRoot\\System32\\Config\\SYSTEM",
    )
