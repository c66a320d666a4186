"""Convert a disk image to a KVM format (qcow2 or raw) with `qemu-img convert`.

The source is only ever read: qemu-img opens a convert source read-only, and its
identity (and, on request, its checksum) is compared before and after. The target
appears only complete: qemu-img writes a reserved temporary name next to it
(`<target>.part-<random>`), which is checked, flushed and then renamed in one step;
any failure or interrupt removes the temporary file. An existing target is never
replaced unless asked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError, VMCraftError
from vmcraft_tasks.craft.images import (
    QEMU_IMG_TIMEOUT_S,
    ImageInfo,
    disk_identity,
    parse_qemu_img_info,
    probe_image,
)

log = logging.getLogger(__name__)

TARGET_FORMATS = frozenset({"qcow2", "raw"})
# `qemu-img check` refuses raw ("This image format does not support checks").
CHECKABLE_FORMATS = frozenset({"qcow2"})
DEFAULT_CONVERT_TIMEOUT_S = 6 * 3600.0
TEMP_INFIX = ".part-"
_HASH_BLOCK = 1024 * 1024

# `qemu-img convert -p` rewrites one line: "    (12.34/100%)\r".
_PROGRESS = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")


class ConversionError(VMCraftError):
    """The conversion could not start, or its result could not be trusted."""

    def __init__(self, source: str, target: str, reason: str) -> None:
        self.source = source
        self.target = target
        self.reason = reason
        super().__init__(f"convert {source} -> {target}: {reason}")


class TargetExistsError(ConversionError):
    """The target already exists and `overwrite` was not given."""


class SourceChangedError(ConversionError):
    """The source changed while it was being converted: the copy is not a snapshot of it."""


@dataclass(frozen=True)
class ConversionResult:
    source: str
    target: str
    source_format: str
    target_format: str
    virtual_size: int
    target_bytes: int  # allocated on disk (sparse files count only what they hold)
    seconds: float
    checked: bool  # `qemu-img check` found no corruption (False: the format has no check)
    source_unchanged: bool
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class CheckReport:
    """What `qemu-img check --output=json` found."""

    corruptions: int
    leaks: int
    check_errors: int

    @property
    def ok(self) -> bool:
        # Leaked clusters waste space but hold no guest data: not a reason to fail.
        return self.corruptions == 0 and self.check_errors == 0


def parse_progress(chunk: str) -> float | None:
    """The last percentage in a piece of `qemu-img convert -p` output, or None (pure)."""
    found = _PROGRESS.findall(chunk)
    if not found:
        return None
    return min(max(float(found[-1]), 0.0), 100.0)


def parse_check(text: str) -> CheckReport:
    """Read `qemu-img check --output=json`; raises ValueError on anything else (pure)."""
    try:
        data = json.loads(text)
        return CheckReport(
            corruptions=int(data.get("corruptions", 0)),
            leaks=int(data.get("leaks", 0)),
            check_errors=int(data["check-errors"]),
        )
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a qemu-img check report: {text[:200]!r}") from exc


def convert_argv(source: str, source_format: str, dest: str, target_format: str) -> list[str]:
    """The `qemu-img convert` command line (pure).

    `-f` is the probed format, so qemu-img never guesses one (a raw image whose first
    sector looks like a qcow2 header must stay raw). No `-U`: the shared lock makes
    qemu-img refuse a source a running VM holds open for writing, which would
    otherwise be copied mid-change.
    """
    return ["qemu-img", "convert", "-p", "-f", source_format, "-O", target_format, source, dest]


def temp_path_for(target: str, token: str) -> str:
    """The temporary name next to `target` (pure): same directory, so the rename is atomic."""
    return f"{target}{TEMP_INFIX}{token}"


def convert_image(
    source: str,
    target: str,
    *,
    target_format: str = "qcow2",
    progress: Callable[[float], None] | None = None,
    timeout_s: float = DEFAULT_CONVERT_TIMEOUT_S,
    overwrite: bool = False,
    verify_checksum: bool = False,
) -> ConversionResult:
    """Convert `source` to `target` in `target_format`; return what was done.

    `progress(percent)` is called with strictly increasing values from qemu-img and
    last with 100.0. `timeout_s` bounds the whole conversion (copy and check); on
    expiry qemu-img is killed and `CommandError(timed_out=True)` raised.
    `verify_checksum` also compares the source's sha256 before and after: it reads
    the whole source twice more, so it is off by default (the identity check,
    device/inode/size/mtime, always runs).

    Raises the `ImageError` of `probe_image` for a missing, unsupported or corrupt
    source, `TargetExistsError`, `SourceChangedError`, `ConversionError` for a
    target that fails its check, and `CommandError` when qemu-img fails.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    if target_format not in TARGET_FORMATS:
        raise ValueError(
            f"target_format must be one of {', '.join(sorted(TARGET_FORMATS))}, "
            f"not {target_format!r}"
        )
    info = probe_image(source)  # missing, unsupported or corrupt: fails here, before any write
    target = os.path.abspath(target)
    _refuse_target(info, target, overwrite=overwrite)
    # probe_image computed the identity right after reading the header.
    identity_before = info.identity
    checksum_before = _sha256(info.path) if verify_checksum else None
    notes: list[str] = []

    temp = _reserve_temp(info.path, target)
    try:
        _copy(info, temp, target_format, progress, deadline)
        checked = _check_target(
            info, temp, target=target, target_format=target_format, deadline=deadline, notes=notes
        )
        _verify_source(info, target, identity_before, checksum_before)
        _fsync_file(temp)
        _publish(info.path, temp, target, overwrite=overwrite)
    finally:
        # After os.replace the name is gone already; after os.link it is a second name.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _fsync_dir(os.path.dirname(target))

    result = ConversionResult(
        source=info.path,
        target=target,
        source_format=info.format,
        target_format=target_format,
        virtual_size=info.virtual_size,
        target_bytes=os.stat(target).st_blocks * 512,
        seconds=round(time.monotonic() - started, 3),
        checked=checked,
        source_unchanged=True,
        notes=tuple(notes),
    )
    log.info(
        "converted %s (%s) -> %s (%s) in %.1f s",
        result.source,
        result.source_format,
        result.target,
        result.target_format,
        result.seconds,
    )
    return result


def _refuse_target(info: ImageInfo, target: str, *, overwrite: bool) -> None:
    """Refuse targets that would destroy data, before an hours-long copy starts."""
    if os.path.isdir(target):
        raise ConversionError(info.path, target, "the target is a directory")
    if not os.path.isdir(os.path.dirname(target)):
        raise ConversionError(info.path, target, "the target's directory does not exist")
    # The source, or any file it reads through, must never be the name we replace.
    protected = [info.path, *info.backing_chain]
    for path in protected:
        if os.path.realpath(path) == os.path.realpath(target) or (
            os.path.exists(target) and os.path.exists(path) and os.path.samefile(path, target)
        ):
            raise ConversionError(
                info.path, target, f"the target is the source or one of its files ({path})"
            )
    if os.path.lexists(target) and not overwrite:
        raise TargetExistsError(
            info.path, target, "the target already exists (pass overwrite=True to replace it)"
        )


def _reserve_temp(source: str, target: str) -> str:
    """Create an empty, unique temporary file next to the target and return its name.

    O_EXCL reserves the name, so two conversions to one target never share a file;
    mode 0o666 minus the umask gives the permissions qemu-img itself would.
    """
    for _ in range(16):
        temp = temp_path_for(target, secrets.token_hex(6))
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConversionError(source, target, f"cannot create {temp}: {exc}") from exc
        os.close(fd)
        return temp
    raise ConversionError(source, target, "no free temporary name next to the target")


def _remaining(deadline: float, argv: list[str]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise CommandError(argv, None, timed_out=True)
    return left


def _copy(
    info: ImageInfo,
    temp: str,
    target_format: str,
    progress: Callable[[float], None] | None,
    deadline: float,
) -> None:
    argv = convert_argv(info.path, info.format, temp, target_format)
    last = -1.0

    def on_output(chunk: str) -> None:
        nonlocal last
        value = parse_progress(chunk)
        # qemu-img repeats values (100.00 twice): callers see each step once.
        if value is not None and value > last:
            last = value
            if progress is not None:
                progress(value)

    commands.run_streaming(argv, on_output=on_output, timeout=_remaining(deadline, argv))
    if progress is not None and last < 100.0:
        progress(100.0)


def _check_target(
    info: ImageInfo,
    temp: str,
    *,
    target: str,
    target_format: str,
    deadline: float,
    notes: list[str],
) -> bool:
    """Confirm the written image opens with the source's size; run `qemu-img check` if any."""
    info_argv = ["qemu-img", "info", "--output=json", "-f", target_format, temp]
    timeout = min(QEMU_IMG_TIMEOUT_S, _remaining(deadline, info_argv))
    result = commands.run(info_argv, timeout=timeout)
    _, size, _ = parse_qemu_img_info(temp, result.stdout)
    if size != info.virtual_size:
        raise ConversionError(
            info.path, target, f"target virtual size {size} differs from source {info.virtual_size}"
        )
    if target_format not in CHECKABLE_FORMATS:
        notes.append(f"{target_format} has no qemu-img check; verified its virtual size only")
        return False
    check_argv = ["qemu-img", "check", "--output=json", "-f", target_format, temp]
    # 2: corruptions, 3: leaked clusters; both still print the JSON report.
    result = commands.run(check_argv, timeout=_remaining(deadline, check_argv), ok_codes=(0, 2, 3))
    try:
        report = parse_check(result.stdout)
    except ValueError as exc:
        raise ConversionError(info.path, target, f"qemu-img check: {exc}") from exc
    if not report.ok:
        raise ConversionError(
            info.path,
            target,
            f"qemu-img check found {report.corruptions} corruptions and "
            f"{report.check_errors} check errors in the converted image",
        )
    if report.leaks:
        notes.append(f"qemu-img check: {report.leaks} leaked clusters (space only, no data)")
    return True


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_source(
    info: ImageInfo, target: str, identity_before: str, checksum_before: str | None
) -> None:
    """Before the target is published: a copy of a changing source is not worth keeping."""
    try:
        identity_after = disk_identity(info.path)
    except FileNotFoundError as exc:
        raise SourceChangedError(
            info.path, target, "the source vanished during conversion"
        ) from exc
    if identity_after != identity_before:
        raise SourceChangedError(
            info.path, target, "the source was modified or replaced during conversion"
        )
    if checksum_before is not None and _sha256(info.path) != checksum_before:
        raise SourceChangedError(info.path, target, "the source's sha256 changed during conversion")


def _fsync_file(path: str) -> None:
    # qemu-img's default cache mode leaves data in the page cache: flush before the
    # rename makes the name visible, so a crash never leaves a named but empty image.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    # The rename itself is durable only once the directory is flushed.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(source: str, temp: str, target: str, *, overwrite: bool) -> None:
    """Give the finished image its final name in one atomic step."""
    if overwrite:
        os.replace(temp, target)
        return
    # link() fails if the name exists, so a target that appeared during the copy is
    # refused rather than replaced (os.replace would silently overwrite it).
    try:
        os.link(temp, target)
    except FileExistsError as exc:
        raise TargetExistsError(
            source, target, "the target appeared during conversion; not replaced"
        ) from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # Filesystems without hard links: the check and the rename are two steps here.
        if os.path.lexists(target):
            raise TargetExistsError(
                source, target, "the target appeared during conversion; not replaced"
            ) from exc
        os.replace(temp, target)
