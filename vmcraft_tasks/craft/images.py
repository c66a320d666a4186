"""Identify a disk image before anything attaches or converts it.

`probe_image` first checks the image and every file it refers to in Python
(`imagecheck`: no qemu process sees the image before that), then asks `qemu-img info`
about each layer through a pinned block graph that cannot follow anything unchecked,
and enforces the size limit. The resulting `ImageInfo` carries that graph
(`qemu_filename()`), which is the only way attach and convert hand the image to qemu,
and the identity of every file, checked again right before use (`verify_unchanged`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import (
    CommandError,
    CorruptImageError,
    ImageChangedError,
    ImageError,
    ImageLimitError,
    ImagePolicyError,
    UnsupportedImageError,
)
from vmcraft_tasks.craft.imagecheck import (
    FORMAT_HINTS,
    CheckedImage,
    FileIdentity,
    Layer,
    check_image,
    identity_changes,
    layer_spec,
    qemu_filename,
    verify_identities,
)
from vmcraft_tasks.craft.imageformats import SUPPORTED_FORMATS
from vmcraft_tasks.craft.settings import CraftSettings

__all__ = [
    "FORMAT_HINTS",
    "QEMU_IMG_TIMEOUT_S",
    "SUPPORTED_FORMATS",
    "ImageInfo",
    "classify_qemu_img_error",
    "disk_identity",
    "parse_backing_chain",
    "parse_qemu_img_info",
    "probe_image",
]

QEMU_IMG_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    identity: str  # stable across attaches of the same files; cache keys use it
    backing_chain: tuple[str, ...] = ()  # backing files, nearest first
    # Every file of the checked chain (image, extents, data files, backing files).
    files: tuple[FileIdentity, ...] = ()
    # The pinned qemu block graph of the checked chain (see imagecheck.layer_spec).
    open_spec: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "identity": self.identity,
            "backing_chain": list(self.backing_chain),
            "files": [f.to_dict() for f in self.files],
            "open_spec": self.open_spec,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageInfo:
        spec = data.get("open_spec")
        return cls(
            path=data["path"],
            format=data["format"],
            virtual_size=int(data["virtual_size"]),
            identity=data["identity"],
            backing_chain=tuple(data.get("backing_chain", ())),
            files=tuple(FileIdentity.from_dict(f) for f in data.get("files", ())),
            open_spec=dict(spec) if isinstance(spec, dict) else None,
        )

    def qemu_filename(self) -> str:
        """What qemu-img and qemu-nbd are given: the pinned graph, never a bare name.

        An ImageInfo built without a check (by hand, or from an old record) still gets
        a pinned node that opens only its own file, with no backing.
        """
        spec = self.open_spec or {
            "driver": self.format,
            "file": {"driver": "file", "filename": self.path},
            "backing": None,
        }
        return qemu_filename(spec)

    @property
    def mode(self) -> int:
        """The permission bits every file of the chain allows (their intersection)."""
        mode = 0o7777
        for f in self.files:
            mode &= f.mode
        return mode if self.files else 0o600

    def changes(self) -> list[str]:
        """How the files differ from when they were checked (empty: unchanged)."""
        return identity_changes(self.files)

    def verify_unchanged(self) -> None:
        """Raise ImageChangedError if any file of the chain changed since the check."""
        verify_identities(self.path, self.files)

    def differences_from(self, expected: ImageInfo) -> list[str]:
        """How this (fresh) check differs from an earlier one of the same image."""
        found = file_differences(expected.files, self.files)
        if not expected.files and expected.identity != self.identity:
            found.append("its identity changed")
        return found


def file_differences(before: Sequence[FileIdentity], now: Sequence[FileIdentity]) -> list[str]:
    """How the files of a chain differ from an earlier check of it (pure).

    The earlier check may come from another host (the client that submitted the
    batch), where the same NFS export has another device number: files are compared
    by inode, size and mtime.
    """
    old_files = {f.path: f for f in before}
    new_files = {f.path: f for f in now}
    found = [f"{p} is no longer part of the image" for p in old_files if p not in new_files]
    found += [f"{p} is new in the image" for p in new_files if p not in old_files]
    for path, old in old_files.items():
        new = new_files.get(path)
        if new is None or (new.inode, new.size, new.mtime_ns) == (
            old.inode,
            old.size,
            old.mtime_ns,
        ):
            continue
        if new.inode != old.inode:
            found.append(f"{old.role} {path} was replaced by another file")
        elif new.size != old.size:
            found.append(f"{old.role} {path} changed size from {old.size} to {new.size} bytes")
        else:
            found.append(f"{old.role} {path} was modified")
    return found


def disk_identity(path: str) -> str:
    """Identity of an image file: device, inode, size and mtime.

    A rewritten file gets a new identity, so cached scans of the old content are
    never served for it.
    """
    st = os.stat(path)
    raw = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def chain_identity(files: Sequence[FileIdentity]) -> str:
    """One identity for all files of a chain; for a single file, `disk_identity`'s."""
    raw = "|".join(f.key for f in files)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def classify_qemu_img_error(image: str, stderr: str) -> ImageError:
    """Map qemu-img's complaint to the error a user can act on (pure)."""
    text = stderr.strip()
    lower = text.lower()
    if "could not open" in lower and "no such file" in lower:
        return CorruptImageError(image, f"incomplete image, a referenced file is missing: {text}")
    if "image format was not specified" in lower or "unknown driver" in lower:
        return UnsupportedImageError(image, f"unsupported image format: {text}")
    if "requires" in lower and "regular file" in lower:
        return ImagePolicyError(image, f"refers to something other than a regular file: {text}")
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


def parse_backing_chain(text: str) -> tuple[str, ...]:
    """Backing file names from `qemu-img info --backing-chain --output=json` (pure)."""
    entries = json.loads(text)
    return tuple(str(e["filename"]) for e in entries[1:])


def vmdk_extent_names(info: dict[str, Any]) -> list[str] | None:
    """The extent files qemu opened, from `qemu-img info --output=json` (pure)."""
    data = (info.get("format-specific") or {}).get("data") or {}
    extents = data.get("extents")
    if not isinstance(extents, list):
        return None
    return [str(e.get("filename", "")) for e in extents if isinstance(e, dict)]


def probe_image(
    path: str,
    *,
    settings: CraftSettings | None = None,
    fmt: str | None = None,
    expected: ImageInfo | None = None,
) -> ImageInfo:
    """Identify `path`; raise an ImageError subclass with a clear reason otherwise.

    `settings` gives the image roots and the size limit (default: from the
    environment, `CraftSettings.from_env()`); `fmt` is the format when the caller
    knows it (an image it wrote), so the content cannot claim another one.
    `expected` is an earlier check of the same image: a file of the chain that
    changed since fails with ImageChangedError, before qemu sees any of it.
    """
    settings = settings if settings is not None else CraftSettings.from_env()
    checked = check_image(
        path, roots=settings.image_roots, fmt=fmt, max_virtual_size=settings.max_virtual_size
    )
    if expected is not None:
        differences = file_differences(expected.files, checked.files)
        if differences:
            raise ImageChangedError(
                checked.path, "changed since it was checked: " + "; ".join(differences)
            )
    size = _ask_qemu(checked)
    if size > settings.max_virtual_size:
        raise ImageLimitError(
            checked.path,
            f"virtual size {size} bytes is above the limit of "
            f"{settings.max_virtual_size_gib} GiB (VMCRAFT_MAX_VIRTUAL_SIZE_GIB)",
        )
    if size <= 0:
        raise CorruptImageError(checked.path, "image has no data (virtual size 0)")
    # Everything above read the files: they must still be the ones checked.
    checked.verify_unchanged()
    return _image_info(checked, size)


def _image_info(checked: CheckedImage, size: int) -> ImageInfo:
    files = checked.files
    return ImageInfo(
        path=checked.path,
        format=checked.format,
        virtual_size=size,
        identity=chain_identity(files),
        backing_chain=checked.backing_chain,
        files=files,
        open_spec=checked.open_spec(),
    )


def _ask_qemu(checked: CheckedImage) -> int:
    """`qemu-img info` on each layer, alone (backing null); the top's virtual size.

    A broken backing file is named here rather than when a conversion reaches it.
    """
    top_size = 0
    for depth, layer in enumerate(checked.top.chain()):
        info = _layer_info(checked.path, layer, backing=depth > 0)
        fmt, size = str(info["format"]), int(info["virtual-size"])
        if fmt != layer.format:
            raise CorruptImageError(checked.path, f"qemu-img reads {layer.path} as {fmt}")
        _cross_check_extents(checked.path, layer, info)
        if depth == 0:
            top_size = size
    return top_size


def _layer_info(image: str, layer: Layer, *, backing: bool) -> dict[str, Any]:
    argv = [
        "qemu-img",
        "info",
        "--output=json",
        qemu_filename(layer_spec(layer, with_backing=False)),
    ]
    try:
        result = commands.run(argv, timeout=QEMU_IMG_TIMEOUT_S)
    except CommandError as exc:
        if exc.returncode is None:
            raise
        error = classify_qemu_img_error(image, exc.stderr)
        if backing:
            raise type(error)(
                image, f"backing chain is broken: {layer.path}: {exc.stderr.strip()}"
            ) from exc
        raise error from exc
    parse_qemu_img_info(image, result.stdout)
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def _cross_check_extents(image: str, layer: Layer, info: dict[str, Any]) -> None:
    """qemu must have opened exactly the extents the check saw: a descriptor line read
    differently by qemu than by the check is refused, not trusted."""
    if layer.format != "vmdk":
        return
    names = vmdk_extent_names(info)
    if names is None:
        return
    expected = [f.opened_as or f.path for f in layer.files if f.role == "extent"]
    if not expected:
        expected = [layer.path]  # a sparse file is its own single extent
    if sorted(names) != sorted(expected):
        raise ImagePolicyError(
            image,
            f"qemu opens the extents {names} but the check saw {expected}: refused",
        )
