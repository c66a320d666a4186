"""Guest CPU architecture from executable headers: ELF and PE parsers (pure) plus a probe.

The header of a binary the guest itself runs is the reliable answer; package
metadata and kernel file names vary by distro and are sometimes missing.
"""

from __future__ import annotations

import struct

from vmcraft_tasks.craft.errors import GuestPathError, InspectError
from vmcraft_tasks.craft.guestpath import GuestFS

# Binaries nearly every Linux guest has, most likely first. Several are symlinks
# (usrmerge: /bin -> usr/bin); GuestFS follows them inside the guest.
LINUX_PROBE_BINARIES = (
    "/usr/bin/ls",
    "/bin/ls",
    "/usr/bin/bash",
    "/bin/bash",
    "/bin/sh",
    "/usr/bin/busybox",
    "/bin/busybox",
    "/usr/lib/systemd/systemd",
    "/lib/systemd/systemd",
    "/sbin/init",
)

HEADER_BYTES = 4096

_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB, _ELFDATA2MSB = 1, 2

EM_SPARC = 2
EM_386 = 3
EM_MIPS = 8
EM_PPC = 20
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_SPARCV9 = 43
EM_IA_64 = 50
EM_X86_64 = 62
EM_AARCH64 = 183
EM_RISCV = 243
EM_LOONGARCH = 258

IMAGE_FILE_MACHINE = {
    0x014C: "i386",
    0x8664: "x86_64",
    0xAA64: "aarch64",
    0x01C4: "armv7l",  # ARMNT, Windows on 32-bit ARM (Thumb-2, little endian)
    0x0200: "ia64",
}


def parse_elf_arch(header: bytes) -> str:
    """Architecture name (uname -m style) from the first bytes of an ELF file.

    Raises InspectError for data that is not ELF or an unknown machine.
    """
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise InspectError("not an ELF file")
    elf_class, data = header[4], header[5]
    if elf_class not in (_ELFCLASS32, _ELFCLASS64) or data not in (_ELFDATA2LSB, _ELFDATA2MSB):
        raise InspectError(f"bad ELF identification (class {elf_class}, data {data})")
    is64 = elf_class == _ELFCLASS64
    little = data == _ELFDATA2LSB
    (machine,) = struct.unpack_from("<H" if little else ">H", header, 18)
    if machine == EM_X86_64:
        return "x86_64"
    if machine == EM_386:
        return "i386"
    if machine == EM_AARCH64:
        return "aarch64" if little else "aarch64_be"
    if machine == EM_ARM:
        return "armv7l" if little else "armv7b"
    if machine == EM_PPC64:
        return "ppc64le" if little else "ppc64"
    if machine == EM_PPC:
        return "ppcle" if little else "ppc"
    if machine == EM_S390:
        # s390x binaries are EM_S390 with 64-bit class; 31-bit ones are plain s390.
        return "s390x" if is64 else "s390"
    if machine == EM_RISCV:
        return "riscv64" if is64 else "riscv32"
    if machine == EM_MIPS:
        name = "mips64" if is64 else "mips"
        return name + "el" if little else name
    if machine == EM_LOONGARCH:
        return "loongarch64" if is64 else "loongarch32"
    if machine in (EM_SPARC, EM_SPARCV9):
        return "sparc64" if is64 else "sparc"
    if machine == EM_IA_64:
        return "ia64"
    raise InspectError(f"unknown ELF machine {machine}")


def parse_pe_arch(header: bytes) -> str:
    """Architecture name from the first bytes of a Windows PE executable."""
    if len(header) < 0x40 or header[:2] != b"MZ":
        raise InspectError("not a PE file (no MZ header)")
    (pe_offset,) = struct.unpack_from("<I", header, 0x3C)
    if pe_offset + 6 > len(header):
        raise InspectError(f"PE header at {pe_offset:#x} is beyond the bytes read")
    if header[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise InspectError("not a PE file (no PE signature)")
    (machine,) = struct.unpack_from("<H", header, pe_offset + 4)
    try:
        return IMAGE_FILE_MACHINE[machine]
    except KeyError:
        raise InspectError(f"unknown PE machine {machine:#06x}") from None


def detect_linux_arch(
    fs: GuestFS, candidates: tuple[str, ...] = LINUX_PROBE_BINARIES
) -> str | None:
    """Architecture of the guest's own binaries; None when none of them is readable ELF."""
    for path in candidates:
        try:
            return parse_elf_arch(fs.head(path, HEADER_BYTES))
        except (GuestPathError, InspectError):
            continue
    return None
