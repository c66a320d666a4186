"""Identify a disk image with `qemu-img info` before anything attaches it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import (
    CommandError,
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    UnsupportedImageError,
)

SUPPORTED_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"})

# The extension is only a hint: it picks the format we ask qemu-img to check first,
# so a text file named x.vmdk is refused as a VMDK instead of passing as raw.
FORMAT_HINTS = {
    ".vmdk": "vmdk",
    ".qcow2": "qcow2",
    ".qcow": "qcow2",
    ".vhd": "vpc",
    ".vpc": "vpc",
    ".vhdx": "vhdx",
    ".vdi": "vdi",
    ".raw": "raw",
    ".img": "raw",
}

QEMU_IMG_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    identity: str  # stable across attaches of the same file; cache keys use it
    backing_chain: tuple[str, ...] = ()  # backing files, nearest first

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "identity": self.identity,
            "backing_chain": list(self.backing_chain),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageInfo:
        return cls(
            path=data["path"],
            format=data["format"],
            virtual_size=int(data["virtual_size"]),
            identity=data["identity"],
            backing_chain=tuple(data.get("backing_chain", ())),
        )


def disk_identity(path: str) -> str:
    """Identity of an image file: device, inode, size and mtime.

    A rewritten file gets a new identity, so cached scans of the old content are
    never served for it.
    """
    st = os.stat(path)
    raw = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def classify_qemu_img_error(image: str, stderr: str) -> ImageError:
    """Map qemu-img's complaint to the error a user can act on (pure)."""
    text = stderr.strip()
    lower = text.lower()
    if "could not open" in lower and "no such file" in lower:
        return CorruptImageError(image, f"incomplete image, a referenced file is missing: {text}")
    if "image format was not specified" in lower or "unknown driver" in lower:
        return UnsupportedImageError(image, f"unsupported image format: {text}")
    return CorruptImageError(image, f"not a readable disk image: {text}")


def parse_qemu_img_info(image: str, text: str) -> tuple[str, int, str | None]:
    """Return (format, virtual size, backing file) from `qemu-img info --output=json`."""
    try:
        info = json.loads(text)
        fmt = str(info["format"])
        size = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptImageError(image, f"qemu-img info gave no usable answer: {exc}") from exc
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return fmt, size, backing


def _info(path: str, fmt: str | None) -> commands.CommandResult:
    argv = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    return commands.run([*argv, path], timeout=QEMU_IMG_TIMEOUT_S)


def probe_image(path: str) -> ImageInfo:
    """Identify `path`; raise an ImageError subclass with a clear reason otherwise."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ImageNotFoundError(path, "no such file")
    if not os.path.isfile(path) and not _is_block_device(path):
        raise UnsupportedImageError(path, "not a regular file or block device")
    if not os.access(path, os.R_OK):
        raise ImageError(path, "not readable")
    hint = FORMAT_HINTS.get(os.path.splitext(path)[1].lower())
    try:
        result = _info(path, hint if hint and hint != "raw" else None)
    except CommandError as exc:
        if exc.returncode is None:
            raise
        raise classify_qemu_img_error(path, exc.stderr) from exc
    fmt, size, backing = parse_qemu_img_info(path, result.stdout)
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(path, f"unsupported image format {fmt!r}")
    if size <= 0:
        raise CorruptImageError(path, "image has no data (virtual size 0)")
    chain = _backing_chain(path, fmt) if backing else ()
    return ImageInfo(
        path=path,
        format=fmt,
        virtual_size=size,
        identity=disk_identity(path),
        backing_chain=chain,
    )


def parse_backing_chain(text: str) -> tuple[str, ...]:
    """Backing file names from `qemu-img info --backing-chain --output=json` (pure)."""
    entries = json.loads(text)
    return tuple(str(e["filename"]) for e in entries[1:])


def _backing_chain(path: str, fmt: str) -> tuple[str, ...]:
    """Open the whole chain once, so a missing or broken backing file is named now."""
    try:
        result = commands.run(
            ["qemu-img", "info", "--backing-chain", "--output=json", "-f", fmt, path],
            timeout=QEMU_IMG_TIMEOUT_S,
        )
    except CommandError as exc:
        raise CorruptImageError(path, f"backing chain is broken: {exc.stderr.strip()}") from exc
    try:
        return parse_backing_chain(result.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptImageError(path, f"unreadable backing chain: {exc}") from exc


def _is_block_device(path: str) -> bool:
    import stat

    return stat.S_ISBLK(os.stat(path).st_mode)
