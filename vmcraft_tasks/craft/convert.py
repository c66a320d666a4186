"""Convert a disk image to a KVM format (qcow2 or raw) with `qemu-img convert`.

The source is only ever read, and only as checked: `probe_image` checks it and every
file it refers to (see `imagecheck`), qemu-img gets the pinned block graph of that
check, and the identity of every file of the chain is compared right before the copy
starts, after it ends and, optionally, against an earlier check (`expected`, e.g. the
one made when the batch was submitted).

The target appears only complete: qemu-img writes a temporary file next to it
(`<target>.part-<random>`, created O_EXCL|O_NOFOLLOW, never more permissive than the
source), which is checked like any image, flushed and then renamed in one step; any
failure or interrupt removes it. A target that is a symlink is refused; an existing
target is replaced only when the caller says it is its own (`overwrite`, optionally
bound to its identity with `replaces`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError, ImageChangedError, ImageError, VMCraftError
from vmcraft_tasks.craft.imagecheck import FileIdentity, file_kind
from vmcraft_tasks.craft.images import ImageInfo, probe_image
from vmcraft_tasks.craft.settings import CraftSettings

log = logging.getLogger(__name__)

TARGET_FORMATS = frozenset({"qcow2", "raw"})
# `qemu-img check` refuses raw ("This image format does not support checks").
CHECKABLE_FORMATS = frozenset({"qcow2"})
DEFAULT_CONVERT_TIMEOUT_S = 6 * 3600.0
TEMP_INFIX = ".part-"
_HASH_BLOCK = 1024 * 1024
# Outputs never give more than owner read-write and group read, and never more than
# the source itself allows: a 0600 source gives a 0600 disk, a 0644 one a 0640 disk.
MAX_TARGET_MODE = 0o640
_RENAME_NOREPLACE = 1

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
    """The source changed while it was being converted, or since it was checked: the
    copy would not be a copy of what was checked."""


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
    # The published file as this conversion made it: what a later `overwrite` may
    # pass as `replaces`, so only this very file is ever replaced.
    target_file: FileIdentity | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        data["target_file"] = self.target_file.to_dict() if self.target_file else None
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
    settings: CraftSettings | None = None,
    expected: ImageInfo | None = None,
    replaces: FileIdentity | None = None,
) -> ConversionResult:
    """Convert `source` to `target` in `target_format`; return what was done.

    `progress(percent)` is called with strictly increasing values from qemu-img and
    last with 100.0. `timeout_s` bounds the whole conversion (copy and check); on
    expiry qemu-img is killed and `CommandError(timed_out=True)` raised.
    `verify_checksum` also compares the source's sha256 before and after: it reads
    the whole source twice more, so it is off by default (the identity check of every
    file of the chain, device/inode/size/mtime, always runs).

    `settings` gives the image roots and limits (default: `CraftSettings.from_env()`).
    `expected` is an earlier `probe_image` of the same source: any file of the chain
    that changed since (replaced, truncated, rewritten) fails the conversion.
    `overwrite` says an existing target is the caller's own output and may be
    replaced; `replaces` pins which file that is (its identity when the caller made it).

    Raises the `ImageError` of `probe_image` for a missing, unsupported, corrupt or
    refused source, `TargetExistsError`, `SourceChangedError`, `ConversionError` for
    a target that cannot be written or fails its check, and `CommandError` when
    qemu-img fails.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    if target_format not in TARGET_FORMATS:
        raise ValueError(
            f"target_format must be one of {', '.join(sorted(TARGET_FORMATS))}, "
            f"not {target_format!r}"
        )
    settings = settings if settings is not None else CraftSettings.from_env()
    target = os.path.abspath(target)
    try:
        # Refused, corrupt or changed since `expected`: fails here, before any write.
        info = probe_image(source, settings=settings, expected=expected)
    except ImageChangedError as exc:
        raise SourceChangedError(exc.image, target, exc.reason) from exc
    _refuse_target(info, target, overwrite=overwrite, replaces=replaces)
    checksum_before = _sha256(info.path) if verify_checksum else None
    notes: list[str] = []

    temp, temp_identity = _reserve_temp(info.path, target, target_mode(info))
    try:
        # The last moment before qemu-img opens the chain: it must be what was checked.
        _verify_source(info, target, "between its check and the start of the conversion")
        _copy(info, temp, target_format, progress, deadline)
        _verify_temp(info.path, target, temp, temp_identity)
        checked = _check_target(
            info,
            temp,
            target=target,
            target_format=target_format,
            settings=settings,
            deadline=deadline,
            notes=notes,
        )
        _verify_source(info, target, "during conversion", checksum_before)
        _fsync_file(temp)
        _publish(info.path, temp, target, overwrite=overwrite, replaces=replaces)
    finally:
        # After os.replace the name is gone already; after os.link it is a second name.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _fsync_dir(os.path.dirname(target))
    published = os.lstat(target)

    result = ConversionResult(
        source=info.path,
        target=target,
        source_format=info.format,
        target_format=target_format,
        virtual_size=info.virtual_size,
        target_bytes=published.st_blocks * 512,
        seconds=round(time.monotonic() - started, 3),
        checked=checked,
        source_unchanged=True,
        notes=tuple(notes),
        target_file=FileIdentity.of(target, "output", published),
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


def target_mode(info: ImageInfo) -> int:
    """The target's permission bits: what every file of the source allows, at most
    MAX_TARGET_MODE (pure)."""
    return info.mode & MAX_TARGET_MODE


def _refuse_target(
    info: ImageInfo, target: str, *, overwrite: bool, replaces: FileIdentity | None
) -> None:
    """Refuse targets that would destroy data, before an hours-long copy starts."""
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise ConversionError(info.path, target, "the target's directory does not exist")
    _refuse_shared_directory(info.path, target, directory)
    # The source, or any file it reads through, must never be the name we replace.
    protected = [info.path, *info.backing_chain]
    protected += [name for f in info.files for name in (f.path, f.opened_as) if name]
    existing = _lstat(target)
    for path in protected:
        if os.path.realpath(path) == os.path.realpath(target) or (
            existing is not None and os.path.exists(path) and os.path.samefile(path, target)
        ):
            raise ConversionError(
                info.path, target, f"the target is the source or one of its files ({path})"
            )
    if existing is None:
        return
    if stat.S_ISLNK(existing.st_mode):
        raise ConversionError(info.path, target, "the target is a symlink: refused")
    if stat.S_ISDIR(existing.st_mode):
        raise ConversionError(info.path, target, "the target is a directory")
    if not overwrite:
        raise TargetExistsError(
            info.path, target, "the target already exists (pass overwrite=True to replace it)"
        )
    _require_own_target(info.path, target, existing, replaces)


def _refuse_shared_directory(source: str, target: str, directory: str) -> None:
    """A directory others may write to without the sticky bit lets them swap the
    temporary file for a symlink between its creation and qemu-img's open."""
    st = os.stat(directory)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConversionError(
            source, target, f"the target's directory {directory} is writable by anyone: refused"
        )


def _require_own_target(
    source: str, target: str, existing: os.stat_result, replaces: FileIdentity | None
) -> None:
    """An existing target may be replaced only if it is a regular file and, when the
    caller named it, still the very file the caller made."""
    if not stat.S_ISREG(existing.st_mode):
        raise ConversionError(
            source, target, f"the target is a {file_kind(existing.st_mode)}: refused"
        )
    if replaces is None:
        return
    now = (existing.st_dev, existing.st_ino, existing.st_size, existing.st_mtime_ns)
    if now != (replaces.device, replaces.inode, replaces.size, replaces.mtime_ns):
        raise TargetExistsError(
            source, target, "the existing target is not the file this tool made: not replaced"
        )


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _reserve_temp(source: str, target: str, mode: int) -> tuple[str, tuple[int, int]]:
    """Create an empty temporary file next to the target; return its name and identity.

    O_EXCL reserves the name and O_NOFOLLOW refuses a planted symlink; 128 random bits
    make the name impossible to plant in advance. The mode is set on the open file
    descriptor, so the umask cannot widen it; qemu-img keeps the file and its mode.
    """
    for _ in range(16):
        temp = temp_path_for(target, secrets.token_hex(16))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConversionError(source, target, f"cannot create {temp}: {exc}") from exc
        try:
            os.fchmod(fd, mode)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return temp, (st.st_dev, st.st_ino)
    raise ConversionError(source, target, "no free temporary name next to the target")


def _verify_temp(source: str, target: str, temp: str, identity: tuple[int, int]) -> None:
    """The file about to be published is still the one created above."""
    st = _lstat(temp)
    if st is None or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != identity:
        raise ConversionError(
            source, target, f"the temporary file {temp} was replaced during conversion"
        )


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
    # The pinned graph of the checked chain, never the bare name: qemu-img must not
    # follow anything the check did not see.
    argv = convert_argv(info.qemu_filename(), info.format, temp, target_format)
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
    settings: CraftSettings,
    deadline: float,
    notes: list[str],
) -> bool:
    """The written image is an image like any other: checked like a source (it must
    refer to nothing), with the source's size; then `qemu-img check` where there is one."""
    if deadline - time.monotonic() <= 0:
        raise CommandError(["qemu-img", "info", temp], None, timed_out=True)
    own = CraftSettings(
        work_dir=settings.work_dir,
        image_roots=(os.path.dirname(temp),),
        max_virtual_size_gib=settings.max_virtual_size_gib,
        max_partitions=settings.max_partitions,
    )
    try:
        written = probe_image(temp, settings=own, fmt=target_format)
    except ImageError as exc:
        raise ConversionError(info.path, target, f"the converted image: {exc.reason}") from exc
    if written.backing_chain or len(written.files) != 1:
        raise ConversionError(info.path, target, "the converted image refers to other files")
    if written.virtual_size != info.virtual_size:
        raise ConversionError(
            info.path,
            target,
            f"target virtual size {written.virtual_size} differs from source {info.virtual_size}",
        )
    if target_format not in CHECKABLE_FORMATS:
        notes.append(f"{target_format} has no qemu-img check; verified its virtual size only")
        return False
    check_argv = [
        "qemu-img",
        "check",
        "--output=json",
        "-f",
        target_format,
        written.qemu_filename(),
    ]
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
    info: ImageInfo, target: str, when: str, checksum_before: str | None = None
) -> None:
    """A copy of a changing source is not worth keeping, nor one of a source that is
    no longer the file that was checked."""
    changes = info.changes()
    if changes:
        raise SourceChangedError(
            info.path,
            target,
            f"the source was modified or replaced {when}: " + "; ".join(changes),
        )
    if checksum_before is not None and _sha256(info.path) != checksum_before:
        raise SourceChangedError(info.path, target, f"the source's sha256 changed {when}")


def _fsync_file(path: str) -> None:
    # qemu-img's default cache mode leaves data in the page cache: flush before the
    # rename makes the name visible, so a crash never leaves a named but empty image.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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


def _publish(
    source: str, temp: str, target: str, *, overwrite: bool, replaces: FileIdentity | None
) -> None:
    """Give the finished image its final name in one atomic step.

    Without `overwrite`, or when the target is gone by now, the name is taken only if
    it is free (link(), or renameat2(RENAME_NOREPLACE) where hard links are not
    supported): a file that appeared during the copy is never replaced. With
    `overwrite`, the existing target is checked once more to be a regular file (and
    the caller's, with `replaces`) and replaced; rename() replaces a symlink itself,
    never what it points to.
    """
    existing = _lstat(target)
    if overwrite and existing is not None:
        if stat.S_ISLNK(existing.st_mode):
            raise ConversionError(source, target, "the target became a symlink: refused")
        _require_own_target(source, target, existing, replaces)
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)
        return
    except FileExistsError as exc:
        raise TargetExistsError(
            source, target, "the target appeared during conversion; not replaced"
        ) from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    _rename_noreplace(source, temp, target)


def _rename_noreplace(source: str, temp: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    result = libc.renameat2(
        at_fdcwd, os.fsencode(temp), at_fdcwd, os.fsencode(target), _RENAME_NOREPLACE
    )
    if result == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise TargetExistsError(
            source, target, "the target appeared during conversion; not replaced"
        )
    raise ConversionError(source, target, f"cannot publish without replacing: {os.strerror(err)}")
