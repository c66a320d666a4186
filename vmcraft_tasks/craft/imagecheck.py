"""An image is only what its own file holds: check every file an image refers to
before qemu opens any of it.

qemu follows whatever an image header names: a backing file anywhere on the host, a
VMDK extent at `/dev/sda`, a qcow2 data file at `/etc/shadow`, `nbd://` or `fat:`
protocol nodes, `json:` graphs. Even `qemu-img info --backing-chain` opens them. So
the headers are parsed here in Python (`imageformats`), and every reference is held
to one policy before any qemu process starts:

- a reference is a plain file name: any protocol (`nbd:`, `http:`, `ssh:`, `fat:`,
  `json:`, `file:` ...) is refused;
- it resolves (symlinks followed) inside the image roots: `CraftSettings.image_roots`,
  or, when none are configured, the directory of the image itself;
- what it resolves to is a regular file (never a block or character device, FIFO,
  socket or directory), checked with lstat before it is opened;
- the chain is bounded (depth, extents) and every format's numbers are checked against
  the file sizes, so a truncated image is refused instead of read as zeros.

The result is a `CheckedImage`: the checked chain, the identity (device, inode, size,
mtime) of each of its files, and the qemu block graph that opens exactly those files
(`open_spec`): every node's driver pinned, every file node `driver=file` (which qemu
refuses for anything but a regular file), `backing` given explicitly or `null`. qemu is
never handed a bare file name it could reinterpret.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from vmcraft_tasks.craft import imageformats as fmts
from vmcraft_tasks.craft.errors import (
    CorruptImageError,
    ImageChangedError,
    ImageError,
    ImageLimitError,
    ImageNotFoundError,
    ImagePolicyError,
    UnsupportedImageError,
)
from vmcraft_tasks.craft.imageformats import DataEnd, FormatError

# VMware snapshot chains are limited to 32 deltas.
MAX_CHAIN_DEPTH = 32
# A split VMDK of 2 GiB extents reaches 8 TiB at 4096; more would not fit in one
# command-line argument (128 KiB) as pinned extent options.
MAX_EXTENTS = 4096
MAX_SPEC_CHARS = 120 * 1024
# qcow2 clusters are at most 2 MiB: the first cluster holds the whole header.
_QCOW2_HEADER_READ = 2 * 1024 * 1024

# The extension is a claim about the content. `.raw` is believed (a guest can write a
# qcow2 header into sector 0 of its raw disk); `.img` is used for raw and qcow2 alike,
# so the content decides, as for unknown names. Other names must match their content.
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
_CONTENT_DECIDES = frozenset({".img"})

ROLE_IMAGE = "image"
ROLE_BACKING = "backing file"
ROLE_EXTENT = "extent"
ROLE_DATA_FILE = "data file"


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class FileIdentity:
    """One file of a checked image, as it was when it was checked."""

    path: str  # resolved path, no symlinks
    role: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    mode: int  # permission bits
    opened_as: str = ""  # the name qemu opens, when not `path` (VMDK extents)

    @classmethod
    def of(cls, path: str, role: str, st: os.stat_result, opened_as: str = "") -> FileIdentity:
        return cls(
            path=path,
            role=role,
            device=st.st_dev,
            inode=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            mode=stat.S_IMODE(st.st_mode),
            opened_as="" if opened_as == path else opened_as,
        )

    @property
    def key(self) -> str:
        return f"{self.device}:{self.inode}:{self.size}:{self.mtime_ns}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "role": self.role,
            "device": self.device,
            "inode": self.inode,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "mode": self.mode,
            "opened_as": self.opened_as,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileIdentity:
        return cls(
            path=str(data["path"]),
            role=str(data["role"]),
            device=int(data["device"]),
            inode=int(data["inode"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            mode=int(data.get("mode", 0o600)),
            opened_as=str(data.get("opened_as", "")),
        )


def describe_change(recorded: FileIdentity, now: os.stat_result | None) -> str | None:
    """What changed about a file since it was checked, or None (pure)."""
    name = f"{recorded.role} {recorded.path}"
    if now is None:
        return f"{name} is gone"
    if stat.S_ISLNK(now.st_mode):
        return f"{name} was replaced by a symlink"
    if not stat.S_ISREG(now.st_mode):
        return f"{name} was replaced by a {file_kind(now.st_mode)}"
    if (now.st_dev, now.st_ino) != (recorded.device, recorded.inode):
        return f"{name} was replaced by another file"
    if now.st_size != recorded.size:
        return f"{name} changed size from {recorded.size} to {now.st_size} bytes"
    if now.st_mtime_ns != recorded.mtime_ns:
        return f"{name} was modified"
    return None


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def identity_changes(files: Sequence[FileIdentity]) -> list[str]:
    """Every way the files differ from what was checked; empty when unchanged.

    The checked (resolved) path must still be the same regular file, and so must the
    name qemu opens, which for a VMDK extent is not the resolved path.
    """
    changes = []
    for recorded in files:
        problem = describe_change(recorded, _lstat_or_none(recorded.path))
        if problem is None and recorded.opened_as:
            problem = describe_change(
                replace(recorded, path=recorded.opened_as), _stat_or_none(recorded.opened_as)
            )
        if problem:
            changes.append(problem)
    return changes


def verify_identities(image: str, files: Sequence[FileIdentity]) -> None:
    """Raise ImageChangedError naming every change since the check."""
    changes = identity_changes(files)
    if changes:
        raise ImageChangedError(image, "changed since it was checked: " + "; ".join(changes))


def file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISBLK, "block device"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class ImagePolicy:
    """Where the files of one image may be."""

    roots: tuple[str, ...]  # resolved
    configured: bool

    @classmethod
    def for_image(cls, image: str, roots: Sequence[str] = ()) -> ImagePolicy:
        if roots:
            return cls(tuple(os.path.realpath(r) for r in roots), configured=True)
        own = os.path.dirname(os.path.abspath(image))
        return cls((os.path.realpath(own),), configured=False)

    def inside(self, real: str) -> bool:
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots)

    def describe(self) -> str:
        if self.configured:
            return f"the image roots ({', '.join(self.roots)})"
        return f"the image's own directory {self.roots[0]} (no image roots are configured)"


def _regular_or_refuse(image: str, what: str, real: str) -> os.stat_result:
    """lstat `real` (already resolved) and refuse anything but a regular file, before
    anything opens it: opening a device node can have effects of its own."""
    st = _lstat_or_none(real)
    if st is None:
        raise CorruptImageError(image, f"incomplete image, a referenced file is missing: {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ImagePolicyError(
            image, f"{what} is a {file_kind(st.st_mode)}, not a regular file: refused"
        )
    return st


def resolve_reference(
    image: str, policy: ImagePolicy, role: str, name: str, base_dir: str
) -> tuple[str, str]:
    """(resolved path, the name qemu opens) for a file name found in a header.

    Relative names are relative to the directory of the file that names them, as in
    qemu. Raises ImagePolicyError for protocols and files outside the roots.
    """
    if fmts.has_protocol(name):
        raise ImagePolicyError(
            image,
            f"{role} {name!r} uses the {fmts.protocol_of(name)}: protocol; "
            "only plain files inside the image roots are allowed",
        )
    opened_as = name if name.startswith("/") else os.path.join(base_dir, name)
    real = os.path.realpath(opened_as)
    if not policy.inside(real):
        raise ImagePolicyError(
            image, f"{role} {name!r} resolves to {real}, outside {policy.describe()}"
        )
    return real, opened_as


# --------------------------------------------------------------------------- files


class _OpenFile:
    """A file opened for reading without following a final symlink or blocking."""

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.st = st

    @property
    def size(self) -> int:
        return self.st.st_size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.st.st_size:
            return b""
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(self.fd, min(length - done, 1 << 24), offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)


@contextmanager
def _open_checked(image: str, what: str, real: str, before: os.stat_result) -> Iterator[_OpenFile]:
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageChangedError(image, f"{what} became a symlink while checked") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ImageError(image, f"{what} is not readable") from exc
        raise CorruptImageError(image, f"{what} cannot be opened: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(st.st_mode):
            raise ImageChangedError(image, f"{what} was replaced while checked")
        yield _OpenFile(fd, st)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """One image file of a chain, with the files it refers to (all checked)."""

    path: str  # resolved; what qemu's file node opens
    format: str
    virtual_size: int  # as the header says (raw: the file size)
    files: tuple[FileIdentity, ...]  # this layer's own files, its main file first
    extents: int = 0  # VMDK descriptor extents: pinned as extents.0 .. extents.N-1
    data_file: str | None = None
    backing: Layer | None = None

    def chain(self) -> Iterator[Layer]:
        layer: Layer | None = self
        while layer is not None:
            yield layer
            layer = layer.backing


def layer_spec(layer: Layer, *, with_backing: bool = True) -> dict[str, Any]:
    """The qemu block node that opens exactly `layer` (pure).

    Every child is pinned: the file node (`driver=file` refuses anything but a regular
    file), VMDK extents (`driver=file`: no protocol, no format probe), the qcow2 data
    file, and the backing node, which is the checked parent or null.
    """
    spec: dict[str, Any] = {
        "driver": layer.format,
        "file": {"driver": "file", "filename": layer.path},
    }
    if layer.extents:
        spec["extents"] = {str(i): {"driver": "file"} for i in range(layer.extents)}
    if layer.data_file:
        spec["data-file"] = {"driver": "file", "filename": layer.data_file}
    backing = layer.backing if with_backing else None
    spec["backing"] = layer_spec(backing) if backing is not None else None
    return spec


def qemu_filename(spec: dict[str, Any]) -> str:
    """A block graph as the one argument qemu-img and qemu-nbd take (pure)."""
    return "json:" + json.dumps(spec, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class CheckedImage:
    path: str  # absolute, as given
    top: Layer
    policy: ImagePolicy = field(compare=False)

    @property
    def format(self) -> str:
        return self.top.format

    @property
    def virtual_size(self) -> int:
        return self.top.virtual_size

    @property
    def files(self) -> tuple[FileIdentity, ...]:
        return tuple(f for layer in self.top.chain() for f in layer.files)

    @property
    def backing_chain(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.top.chain())[1:]

    def open_spec(self) -> dict[str, Any]:
        return layer_spec(self.top)

    def verify_unchanged(self) -> None:
        verify_identities(self.path, self.files)


@dataclass
class _Context:
    image: str  # what errors name
    policy: ImagePolicy
    max_virtual_size: int | None
    seen: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class _Parsed:
    """What one format's header says, before its references are checked."""

    virtual_size: int
    backing: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    extents: tuple[fmts.VmdkExtentLine, ...] = ()
    mentioned: tuple[str, ...] = ()
    data_end: DataEnd = field(default_factory=DataEnd)


def check_image(
    path: str,
    *,
    roots: Sequence[str] = (),
    fmt: str | None = None,
    max_virtual_size: int | None = None,
) -> CheckedImage:
    """Check `path` and everything it refers to, reading headers only (no qemu).

    `fmt` is the caller's knowledge of the format (a file it wrote itself); without
    it the name and the content decide (see FORMAT_HINTS). Raises ImageNotFoundError,
    UnsupportedImageError, CorruptImageError, ImagePolicyError or ImageLimitError,
    each naming the image and what is wrong.
    """
    image = os.path.abspath(path)
    policy = ImagePolicy.for_image(image, roots)
    st = _lstat_or_none(image)
    if st is None:
        raise ImageNotFoundError(image, "no such file")
    real = os.path.realpath(image)
    if not policy.inside(real):
        raise ImagePolicyError(image, f"the image resolves to {real}, outside {policy.describe()}")
    st = _lstat_or_none(real)
    if st is None:
        raise ImageNotFoundError(image, f"no such file (a symlink to the missing {real})")
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        raise ImagePolicyError(
            image, f"not a regular file but a {file_kind(st.st_mode)}: host devices are refused"
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedImageError(image, f"not a regular file (a {file_kind(st.st_mode)})")
    if not os.access(real, os.R_OK):
        raise ImageError(image, "not readable")
    ctx = _Context(image, policy, max_virtual_size)
    top = _check_layer(ctx, real, st, fmt=fmt, hint=_hint(image), depth=0)
    checked = CheckedImage(path=image, top=top, policy=policy)
    spec_chars = len(qemu_filename(checked.open_spec()))
    if spec_chars > MAX_SPEC_CHARS:
        raise ImageLimitError(image, f"the image's block graph is too large ({spec_chars} chars)")
    return checked


def _hint(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in _CONTENT_DECIDES:
        return None
    return FORMAT_HINTS.get(ext)


def _what(role: str, path: str) -> str:
    return "the image" if role == ROLE_IMAGE else f"{role} {path}"


def _of(reference: str, what: str) -> str:
    """`backing file`, or `backing file of backing file /x/base.qcow2` deeper down."""
    return reference if what == "the image" else f"{reference} of {what}"


def _check_layer(
    ctx: _Context,
    real: str,
    before: os.stat_result,
    *,
    fmt: str | None,
    hint: str | None,
    depth: int,
    role: str = ROLE_IMAGE,
) -> Layer:
    if depth > MAX_CHAIN_DEPTH:
        raise ImageLimitError(ctx.image, f"the backing chain is deeper than {MAX_CHAIN_DEPTH}")
    key = (before.st_dev, before.st_ino)
    if key in ctx.seen:
        raise CorruptImageError(ctx.image, f"the backing chain loops back to {real}")
    ctx.seen.add(key)
    what = _what(role, real)
    with _open_checked(ctx.image, what, real, before) as f:
        layer_format = _decide_format(ctx.image, what, f, fmt=fmt, hint=hint)
        parsed = _parse(ctx.image, what, layer_format, f)
        _check_limit(ctx, what, parsed.virtual_size)
        files = [FileIdentity.of(real, role, f.st)]
        _require_complete(ctx.image, what, parsed.data_end.image, f.size, parsed.data_end.slack)
    base_dir = os.path.dirname(real)
    data_file = _check_data_file(ctx, what, parsed, base_dir, files)
    _check_extents(ctx, what, parsed, base_dir, files)
    backing = None
    if parsed.backing:
        backing = _check_backing(ctx, what, parsed, base_dir, depth)
    return Layer(
        path=real,
        format=layer_format,
        virtual_size=parsed.virtual_size,
        files=tuple(files),
        extents=len(parsed.extents),
        data_file=data_file,
        backing=backing,
    )


def _check_limit(ctx: _Context, what: str, size: int) -> None:
    limit = ctx.max_virtual_size
    if limit is not None and size > limit:
        raise ImageLimitError(
            ctx.image,
            f"{what} has a virtual size of {size} bytes ({_human(size)}), above the limit of "
            f"{_human(limit)} (VMCRAFT_MAX_VIRTUAL_SIZE_GIB)",
        )


def _human(size: int) -> str:
    for unit, factor in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} bytes"


def _require_complete(image: str, what: str, end: int, size: int, slack: int) -> None:
    """Refuse a file shorter than what its own tables point at (qemu reads the
    missing part as zeros); a last cluster cut short by less than `slack` is
    tolerated, as `qemu-img check` does."""
    if end - size >= max(slack, 1):
        raise CorruptImageError(
            image,
            f"truncated: {what} refers to data up to byte {end} but holds only {size} bytes",
        )


def _decide_format(
    image: str, what: str, f: _OpenFile, *, fmt: str | None, hint: str | None
) -> str:
    head = f.read(0, fmts.PROBE_SIZE)
    detected = fmts.detect_format(head)
    if fmt is not None:
        if fmt not in fmts.SUPPORTED_FORMATS:
            raise UnsupportedImageError(image, f"unsupported image format {fmt!r}")
        if fmt != "raw" and detected not in (fmt, "raw"):
            raise CorruptImageError(image, f"{what} is a {detected} image, not {fmt}")
        return fmt
    if hint == "vpc" and detected == "raw":
        return "vpc"  # a fixed VHD: its only footer is at the end
    if hint is not None and hint != "raw" and detected not in (hint, "raw"):
        raise CorruptImageError(image, f"{what} is a {detected} image, not {hint} as its name says")
    chosen = hint or detected
    if chosen not in fmts.SUPPORTED_FORMATS:
        raise UnsupportedImageError(image, f"unsupported image format {chosen!r}")
    return chosen


def _parse(image: str, what: str, layer_format: str, f: _OpenFile) -> _Parsed:
    parsers = {
        "raw": lambda: _Parsed(virtual_size=f.size),
        "qcow2": lambda: _parse_qcow2(image, what, f),
        "vmdk": lambda: _parse_vmdk(image, what, f),
        "vpc": lambda: _parse_vpc(image, what, f),
        "vhdx": lambda: _parse_vhdx(image, what, f),
        "vdi": lambda: _parse_vdi(image, what, f),
    }
    try:
        return parsers[layer_format]()
    except FormatError as exc:
        raise CorruptImageError(image, f"not a readable disk image: {what}: {exc}") from exc


def _parse_qcow2(image: str, what: str, f: _OpenFile) -> _Parsed:
    header = fmts.parse_qcow2_header(f.read(0, _QCOW2_HEADER_READ))
    if header.crypt_method:
        raise UnsupportedImageError(image, f"{what} is an encrypted qcow2: not supported")
    if header.has_data_file and not header.data_file:
        raise CorruptImageError(image, f"{what} needs an external data file but names none")
    return _Parsed(
        virtual_size=header.virtual_size,
        backing=header.backing_file,
        backing_format=header.backing_format,
        data_file=header.data_file,
        data_end=fmts.qcow2_data_end(header, f.read),
    )


def _parse_vmdk(image: str, what: str, f: _OpenFile) -> _Parsed:
    head = f.read(0, fmts.PROBE_SIZE)
    if head[:4] == fmts.VMDK3_MAGIC:
        sectors = int.from_bytes(head[12:16], "little")
        return _Parsed(
            virtual_size=sectors * fmts.SECTOR,
            backing=_sparse_parent(f, None),
            backing_format="vmdk",
        )
    if head[:4] == fmts.VMDK4_MAGIC:
        header = fmts.parse_vmdk_sparse_header(head)
        embedded = f.read(header.desc_offset * fmts.SECTOR, fmts.VMDK_MAX_DESC)
        if header.holds_descriptor:
            parsed = _descriptor(fmts.descriptor_text(embedded))
            parsed.backing = _sparse_parent(f, None)
            return parsed
        return _Parsed(
            virtual_size=header.capacity * fmts.SECTOR,
            backing=_sparse_parent(f, embedded if header.desc_offset else None),
            backing_format="vmdk",  # qemu opens a VMDK parent as VMDK, whatever it holds
            data_end=fmts.vmdk_sparse_data_end(header, f.read),
        )
    text = fmts.descriptor_text(f.read(0, fmts.VMDK_MAX_DESC))
    parsed = _descriptor(text)
    parsed.backing = fmts.vmdk_parent_hint(f.read(0, fmts.VMDK_DESC_SIZE))
    return parsed


def _descriptor(text: str) -> _Parsed:
    descriptor = fmts.parse_vmdk_descriptor(text)
    size = sum(e.sectors for e in descriptor.extents) * fmts.SECTOR
    return _Parsed(
        virtual_size=size,
        backing_format="vmdk",
        extents=descriptor.extents,
        mentioned=descriptor.mentioned,
    )


def _sparse_parent(f: _OpenFile, embedded: bytes | None) -> str | None:
    """The parent of a sparse VMDK, where qemu reads it (sector 1, whatever the header
    says); a different parent in the header's own descriptor is refused as ambiguous."""
    parent = fmts.vmdk_parent_hint(f.read(fmts.VMDK_SPARSE_DESC_OFFSET, fmts.VMDK_DESC_SIZE))
    if embedded is not None:
        declared = fmts.vmdk_parent_hint(embedded)
        if declared != parent:
            raise FormatError(
                f"the descriptor names parent {declared!r} but qemu would open {parent!r}"
            )
    return parent


def _parse_vpc(image: str, what: str, f: _OpenFile) -> _Parsed:
    head = f.read(0, fmts.SECTOR)
    raw = head if head[:8] == fmts.VPC_MAGIC else f.read(f.size - fmts.SECTOR, fmts.SECTOR)
    footer = fmts.parse_vpc_footer(raw)
    if footer.disk_type == fmts.VPC_DIFFERENCING:
        raise ImagePolicyError(
            image,
            f"{what} is a differencing VHD: its data depends on a parent disk outside the "
            "file, and parents of VHD disks are never followed (merge it first)",
        )
    return _Parsed(virtual_size=footer.current_size)


def _parse_vhdx(image: str, what: str, f: _OpenFile) -> _Parsed:
    try:
        info = fmts.parse_vhdx(f.read)
    except FormatError:
        # qemu validates VHDX metadata itself and never opens a VHDX parent.
        return _Parsed(virtual_size=0)
    if info.has_parent:
        raise ImagePolicyError(
            image,
            f"{what} is a differencing VHDX: its data depends on a parent disk outside the "
            "file, and parents of VHDX disks are never followed (merge it first)",
        )
    return _Parsed(virtual_size=info.virtual_size or 0)


def _parse_vdi(image: str, what: str, f: _OpenFile) -> _Parsed:
    header = fmts.parse_vdi_header(f.read(0, fmts.SECTOR))
    if header.image_type not in (fmts.VDI_TYPE_DYNAMIC, fmts.VDI_TYPE_STATIC):
        raise UnsupportedImageError(image, f"{what} is a {header.type_name} VDI: not supported")
    return _Parsed(virtual_size=header.disk_size, data_end=fmts.vdi_data_end(header, f.read))


def _check_data_file(
    ctx: _Context, what: str, parsed: _Parsed, base_dir: str, files: list[FileIdentity]
) -> str | None:
    """qemu opens a qcow2 data file name relative to its own working directory; here
    it is relative to the image, and pinned, so qemu opens the file that was checked."""
    if not parsed.data_file:
        return None
    real, _ = resolve_reference(
        ctx.image, ctx.policy, _of("data file", what), parsed.data_file, base_dir
    )
    label = f"data file {real}"
    st = _regular_or_refuse(ctx.image, label, real)
    files.append(FileIdentity.of(real, ROLE_DATA_FILE, st))
    _require_complete(
        ctx.image, label, parsed.data_end.data_file, st.st_size, parsed.data_end.slack
    )
    return real


def _check_extents(
    ctx: _Context, what: str, parsed: _Parsed, base_dir: str, files: list[FileIdentity]
) -> None:
    if len(parsed.extents) > MAX_EXTENTS:
        raise ImageLimitError(ctx.image, f"{what} has more than {MAX_EXTENTS} extents")
    opened = {e.filename for e in parsed.extents}
    for name in parsed.mentioned:
        if name not in opened:
            # A line qemu skips: it must not name anything the roots do not hold either.
            resolve_reference(ctx.image, ctx.policy, _of("extent", what), name, base_dir)
    for extent in parsed.extents:
        real, opened_as = resolve_reference(
            ctx.image, ctx.policy, _of("extent", what), extent.filename, base_dir
        )
        label = f"extent {real}"
        st = _regular_or_refuse(ctx.image, label, real)
        files.append(FileIdentity.of(real, ROLE_EXTENT, st, opened_as))
        if extent.type in fmts.VMDK_FLAT_TYPES:
            end = (extent.offset + extent.sectors) * fmts.SECTOR
            _require_complete(ctx.image, label, end, st.st_size, 0)
        elif extent.type in ("SPARSE", "VMFSSPARSE"):
            _check_sparse_extent(ctx, label, real, st)


def _check_sparse_extent(ctx: _Context, label: str, real: str, st: os.stat_result) -> None:
    with _open_checked(ctx.image, label, real, st) as f:
        head = f.read(0, fmts.PROBE_SIZE)
        if head[:4] != fmts.VMDK4_MAGIC:
            return  # COWD, or not VMDK at all: qemu reads or refuses it; it names nothing
        try:
            header = fmts.parse_vmdk_sparse_header(head)
            if header.holds_descriptor:
                raise ImagePolicyError(
                    ctx.image, f"{label} holds a descriptor of its own: nested VMDK refused"
                )
            end = fmts.vmdk_sparse_data_end(header, f.read)
        except FormatError as exc:
            raise CorruptImageError(
                ctx.image, f"not a readable disk image: {label}: {exc}"
            ) from exc
        _require_complete(ctx.image, label, end.image, f.size, end.slack)


def _check_backing(ctx: _Context, what: str, parsed: _Parsed, base_dir: str, depth: int) -> Layer:
    assert parsed.backing is not None
    role = _of("backing file", what)
    real, _ = resolve_reference(ctx.image, ctx.policy, role, parsed.backing, base_dir)
    st = _lstat_or_none(real)
    if st is None:
        raise CorruptImageError(ctx.image, f"backing chain is broken: {real} does not exist")
    if not stat.S_ISREG(st.st_mode):
        raise ImagePolicyError(
            ctx.image,
            f"backing file {real} is a {file_kind(st.st_mode)}, not a regular file: refused",
        )
    backing_format = parsed.backing_format
    if backing_format is not None and backing_format not in fmts.SUPPORTED_FORMATS:
        raise ImagePolicyError(
            ctx.image,
            f"backing file {real} is declared as {backing_format!r}: only "
            f"{', '.join(sorted(fmts.SUPPORTED_FORMATS))} backing files are allowed",
        )
    try:
        return _check_layer(
            ctx, real, st, fmt=backing_format, hint=None, depth=depth + 1, role=ROLE_BACKING
        )
    except UnsupportedImageError as exc:
        raise UnsupportedImageError(ctx.image, f"backing file {real}: {exc.reason}") from exc
