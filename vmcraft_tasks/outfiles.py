"""Output folders the tool may write to, and files it creates there safely.

The fleet runs as root and writes where a manifest says. So:

- an output folder must lie under an output root (`VMCRAFT_OUTPUT_ROOTS`, else the
  manifest's folder), must not be a system folder, and must be reached from its root
  without any symlink (`check_output_dir`, used by the manifest loader for early errors
  and again by the worker before it writes);
- every file operation goes through a directory fd opened component by component with
  `O_NOFOLLOW` from the root (`OutputDir`), so a symlink swapped in after the check is
  refused, not followed;
- files are written under unpredictable temporary names created with
  `O_CREAT|O_EXCL|O_NOFOLLOW`, fsynced, then published by `link` (which fails if the
  name appeared meanwhile) or by `rename` over a file the tool made itself;
- a file the tool did not make is never replaced: the VM fails naming it.

Which files the tool made is kept in a per-folder ledger, `.vmcraft-outputs.json`,
rather than in an extended attribute on each file: a ledger works on every file system
the outputs may live on (NFS shared by several hosts included, where user xattrs are
often missing), needs no secret key (a `user.*` xattr can be set by anyone who owns the
planted file, so it would have to carry an HMAC), and shows operators in one place what
the tool owns. It cannot be forged by anyone but root: it is trusted only when it is a
regular file owned by the worker's user and writable by no one else. A deleted or
distrusted ledger makes the tool's own files look foreign, which fails safe (the VM fails
naming the file; nothing is overwritten).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

LEDGER_NAME = ".vmcraft-outputs.json"
LOCK_NAME = ".vmcraft-outputs.lock"
LEDGER_VERSION = 1
MARKER_SUFFIX = ".vmcraft.json"  # <disk>.vmcraft.json: the finished-conversion marker
SUMMARY_NAMES = ("summary.json", "summary.md")
TEMP_SUFFIX = ".tmp"
DIR_MODE = 0o750
FILE_MODE = 0o640  # reports, domain XML, markers, summaries
OUTPUT_MODE_CAP = 0o640  # converted disks: never wider than this, nor than their source
LOCK_TIMEOUT_S = 30.0
MAX_LEDGER_BYTES = 64 << 20
MAX_SMALL_FILE_BYTES = 4 << 20  # markers and other small files read back

# Kinds of output. A disk is changed in place by the fix step, so only its inode
# identifies it; every other kind is replaced whole, so its size and mtime must match too.
DISK = "disk"
KINDS = frozenset({DISK, "report", "xml", "marker", "summary", "log"})

_OPEN_EXISTING = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO never blocks
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- errors -------------------------------------------------------------------------


class OutputError(ValueError):
    """An output cannot be written where the plan says; the message is one line for a
    VM's failure reason. Constructible from the message alone, so Celery can rebuild it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class OutputPathError(OutputError):
    """An output folder outside the roots, a system folder, or one reached via a symlink."""


class MissingFolderError(OutputPathError):
    """An output folder (or one of its parents) does not exist and was not to be created."""


class OutputNameError(OutputError):
    """A VM id or file name that collides with the tool's own file names."""


class ForeignFileError(OutputError):
    """A file the tool did not make sits where an output must go: it is never replaced."""


# --- names --------------------------------------------------------------------------

# Pieces of the tool's own file names: a VM id holding one could name another VM's
# marker, report or temporary file (`web01-disk0.qcow2.vmcraft` -> its report would be
# web01's marker).
_RESERVED_PARTS = (".vmcraft", ".json", ".xml", ".md", ".part", ".tmp")
_DISK_PART = re.compile(r"-disk\d+\.(?:qcow2|raw)", re.IGNORECASE)
_RESERVED_IDS = frozenset({"summary"})
_NAME_MAX = 255


def vm_id_problem(vm_id: str) -> str | None:
    """Why `vm_id` may not be used as a VM id, or None (pure)."""
    lowered = vm_id.lower()  # case-insensitive: outputs may land on a case-folding share
    if lowered in _RESERVED_IDS:
        return f"{vm_id!r} is reserved: the batch summary is summary.json and summary.md"
    if vm_id.startswith("."):
        return f"{vm_id!r} starts with '.': such names are the tool's temporary files and ledger"
    for part in _RESERVED_PARTS:
        if part in lowered:
            return f"{vm_id!r} contains {part!r}, which the tool's own file names use"
    disk = _DISK_PART.search(vm_id)
    if disk:
        return f"{vm_id!r} contains {disk.group()!r}, the name of a converted disk"
    return None


def check_vm_id(vm_id: object) -> str:
    """`vm_id` if its output files cannot collide with anything the tool writes."""
    if not isinstance(vm_id, str) or not vm_id or "/" in vm_id or "\0" in vm_id:
        raise OutputNameError(f"invalid VM id {vm_id!r}")
    problem = vm_id_problem(vm_id)
    if problem:
        raise OutputNameError(f"VM id {problem}")
    return vm_id


def check_file_name(name: str) -> str:
    """`name` if it is one plain file name (no folder part, not . or ..)."""
    if not name or name in {".", ".."} or "/" in name or "\0" in name or len(name) > _NAME_MAX:
        raise OutputNameError(f"invalid output file name {name!r}")
    return name


def disk_file_name(vm_id: str, index: int, target_format: str) -> str:
    """`<vm>-disk<index>.<format>`: where disk `index` of a VM is converted to (pure)."""
    return f"{vm_id}-disk{index}.{target_format}"


def vm_file_names(vm_id: str, disks: int, target_format: str) -> tuple[str, ...]:
    """Every name one VM's outputs take in its folder (pure)."""
    names = [f"{vm_id}.json", f"{vm_id}.xml"]
    for index in range(disks):
        disk = disk_file_name(vm_id, index, target_format)
        names += [disk, disk + MARKER_SUFFIX]
    return tuple(names)


# --- folders ------------------------------------------------------------------------

# Trees that belong to the operating system: a file there may be read as configuration,
# a library, a unit or a device.
_SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/boot",
    "/efi",
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/var",
    "/snap",
    "/lost+found",
)
_LIB_TREE = re.compile(r"^/lib[^/]*")  # /lib, /lib32, /lib64, /libx32
# Places inside those trees that are meant for data like ours.
_DATA_TREES = ("/var/tmp", "/var/lib/vmcraft", "/var/cache/vmcraft", "/var/lib/libvirt/images")
# Folders that may hold output folders but are not one: their own files belong to
# everyone (or to root's login).
_SHARED_FOLDERS = frozenset(
    {"/", "/root", "/home", "/tmp", "/var/tmp", "/mnt", "/media", "/srv", "/opt"}
)


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def system_folder_reason(path: str) -> str | None:
    """Why `path` (absolute) is a system folder no output may go into, or None (pure)."""
    path = os.path.normpath(path)
    if path in _SHARED_FOLDERS:
        return f"{path} is a system folder: use a folder below it"
    if any(_under(path, tree) for tree in _DATA_TREES):
        return None
    for tree in _SYSTEM_TREES:
        if _under(path, tree):
            return f"inside {tree}, a system folder"
    lib = _LIB_TREE.match(path)
    if lib:
        return f"inside {lib.group()}, a system folder"
    return None


@dataclass(frozen=True)
class Confined:
    """An output folder as checked: its resolved root and the components below it."""

    root: str
    parts: tuple[str, ...]

    @property
    def path(self) -> str:
        return os.path.join(self.root, *self.parts)


def _relative_to(path: str, root: str) -> tuple[str, ...] | None:
    """The components of `path` below `root` (as written or as resolved), or None."""
    for form in dict.fromkeys((os.path.normpath(root), os.path.realpath(root))):
        if _under(path, form):
            rel = os.path.relpath(path, form)
            return tuple(p for p in rel.split("/") if p not in {"", "."})
    return None


def within(path: str, roots: Sequence[str]) -> bool:
    """True when absolute `path` lies under one of `roots`, as written or resolved (pure
    but for realpath of the roots)."""
    given = os.path.normpath(path)
    return any(_relative_to(given, root) is not None for root in roots)


def _other_writable(st: os.stat_result) -> bool:
    # Anyone could rename files in such a folder; sticky folders (/tmp) stop that.
    return bool(st.st_mode & stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX


def _check_components(shown: str, root: str, parts: Sequence[str]) -> None:
    """Existing components below the root must be real folders, not symlinks."""
    current = root
    for part in parts:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # the rest is created later, component by component
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(current)
            raise OutputPathError(
                f"{shown}: {current} is a symlink (to {target}); output folders must be "
                "reached without symlinks",
                path=shown,
            )
        if not stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{shown}: {current} is not a folder", path=shown)
        if _other_writable(st):
            raise OutputPathError(
                f"{shown}: {current} is writable by everyone (and not sticky)", path=shown
            )


def _refuse_system_folder(shown: str, candidate: str) -> None:
    reason = system_folder_reason(candidate)
    if reason:
        raise OutputPathError(f"{shown}: {reason}", path=shown)


def confine(path: str, roots: Sequence[str]) -> Confined:
    """Check an output folder (see `check_output_dir`) and say which root holds it."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise OutputPathError(f"invalid output folder {path!r}", path=str(path))
    if not os.path.isabs(path):
        raise OutputPathError(f"{path}: an output folder must be an absolute path", path=path)
    if not roots:
        raise OutputPathError(
            f"{path}: no output roots to check it against (set VMCRAFT_OUTPUT_ROOTS)", path=path
        )
    given = os.path.normpath(path)
    for root in roots:
        parts = _relative_to(given, root)
        if parts is None:
            continue
        confined = Confined(os.path.realpath(root), parts)
        _refuse_system_folder(path, given)  # as written first: the clearest reason
        _check_components(path, confined.root, parts)
        resolved = os.path.realpath(confined.path)
        if not _under(resolved, confined.root):
            raise OutputPathError(
                f"{path}: resolves to {resolved}, outside its output root", path=path
            )
        _refuse_system_folder(path, confined.path)
        _refuse_system_folder(path, resolved)
        return confined
    raise OutputPathError(f"{path}: outside the output roots ({', '.join(roots)})", path=path)


def check_output_dir(path: str, roots: Sequence[str]) -> str:
    """The output folder `path` as it will be used (absolute, symlink-free), if allowed.

    Allowed: under one of `roots` (as written or resolved), not a system folder (/etc,
    /usr, /var except /var/tmp and /var/lib/vmcraft, /, /home itself, ...), and every
    existing component below the root a real folder, not a symlink. Missing components
    are fine (they are created 0750 when written). Raises OutputPathError naming what is
    wrong. Pure but for lstat/realpath: usable by the client (early errors) and the worker.
    """
    return confine(path, roots).path


def output_roots_for(settings_roots: Sequence[str], recorded_root: str | None) -> tuple[str, ...]:
    """The roots a writer checks against: its own `VMCRAFT_OUTPUT_ROOTS` when set, else
    the root the client recorded in the batch plan (the plan comes from Redis, trusted)."""
    if settings_roots:
        return tuple(settings_roots)
    if recorded_root:
        return (recorded_root,)
    raise OutputPathError(
        "no output root: the batch plan records none and VMCRAFT_OUTPUT_ROOTS is not set"
    )


# --- file identity and modes --------------------------------------------------------


@dataclass(frozen=True)
class FileIdentity:
    """What names one version of a file: device, inode, size and mtime."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def to_dict(self) -> dict[str, int]:
        return {"dev": self.dev, "ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_dict(cls, data: Any) -> FileIdentity:
        if not isinstance(data, dict):
            raise ValueError(f"not a file identity: {data!r}")
        return cls(*(int(data[k]) for k in ("dev", "ino", "size", "mtime_ns")))


def output_mode(source_mode: int) -> int:
    """Permissions of a converted disk: the source's, never wider than 0640, and always
    owner read/write (the fix step writes it). A 0600 source gives 0600 (pure)."""
    return (stat.S_IMODE(source_mode) & OUTPUT_MODE_CAP) | 0o600


# --- the ledger of the tool's own files ---------------------------------------------

_THREAD_LOCKS: dict[tuple[int, int], threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(st: os.stat_result) -> threading.Lock:
    # flock excludes other processes (and other hosts over NFS, where it becomes a
    # POSIX lock that does not exclude threads of one process): threads need their own.
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault((st.st_dev, st.st_ino), threading.Lock())


def _entry(kind: str, st: os.stat_result) -> dict[str, Any]:
    return {"kind": kind, **FileIdentity.of(st).to_dict(), "written": round(time.time(), 3)}


def _entries(recorded: Any) -> list[dict[str, Any]]:
    """The identities a ledger holds for one name: the published file's and, while a
    replacement is being published, the new one's."""
    if isinstance(recorded, dict):
        return [recorded]
    if isinstance(recorded, list):
        return [e for e in recorded if isinstance(e, dict)]
    return []


def _is_recorded(recorded: Any, st: os.stat_result) -> bool:
    return any(_matches(entry, st) for entry in _entries(recorded))


def _matches(entry: dict[str, Any], st: os.stat_result) -> bool:
    """True when the ledger entry names this very file (and, but for disks, this version)."""
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_uid != os.geteuid():
        return False
    try:
        ident = FileIdentity.from_dict(entry)
    except (KeyError, TypeError, ValueError):
        return False
    if (ident.dev, ident.ino) != (st.st_dev, st.st_ino):
        return False
    if entry.get("kind") == DISK:
        return True
    return (ident.size, ident.mtime_ns) == (st.st_size, st.st_mtime_ns)


def _describe(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    return "not in the folder's ledger"


# --- the open output folder ---------------------------------------------------------


class OutputDir:
    """An output folder opened safely; every operation goes through its directory fd.

    Use as a context manager: `with OutputDir.open(path, roots) as out: out.write_text(...)`.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str, roots: Sequence[str], *, create: bool = True) -> OutputDir:
        """Check `path` against `roots`, then open it from its root one component at a
        time without following symlinks, creating missing ones 0750 when `create`."""
        confined = confine(path, roots)
        try:
            fd = os.open(confined.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OutputPathError(
                f"{path}: output root {confined.root} cannot be opened: {exc.strerror}",
                path=path,
            ) from exc
        current = confined.root
        try:
            for part in confined.parts:
                current = os.path.join(current, part)
                child = _open_child_dir(fd, part, current, create=create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, confined.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def join(self, name: str) -> str:
        return os.path.join(self.path, check_file_name(name))

    # --- looking ---

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.lstat(check_file_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def is_own(self, name: str) -> bool:
        """True when `name` is a file this tool wrote here (and, but for disks, unchanged)."""
        st = self.lstat(name)
        return st is not None and _is_recorded(self._read_ledger().get(name), st)

    def require_replaceable(self, name: str) -> None:
        """Raise ForeignFileError unless `name` is free or a file the tool made."""
        self._require_replaceable(name, self._read_ledger())

    def open_own(self, name: str) -> tuple[int, os.stat_result] | None:
        """An O_RDONLY fd and its stat for one of the tool's files; None when absent.

        Raises ForeignFileError when something else has the name."""
        ledger = self._read_ledger()
        try:
            fd = os.open(check_file_name(name), _OPEN_EXISTING, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._foreign(name, "a symlink") from exc
            raise
        st = os.fstat(fd)
        if not _is_recorded(ledger.get(name), st):
            os.close(fd)
            raise self._foreign(name, _describe(st))
        return fd, st

    def read_own(self, name: str, *, limit: int = MAX_SMALL_FILE_BYTES) -> bytes | None:
        """The contents of one of the tool's (small) files; None when absent."""
        opened = self.open_own(name)
        if opened is None:
            return None
        fd, st = opened
        try:
            if st.st_size > limit:
                raise OutputError(
                    f"{self.join(name)}: {st.st_size} bytes, more than {limit}",
                    path=self.join(name),
                )
            return _read_all(fd, limit)
        finally:
            os.close(fd)

    # --- writing ---

    def write_text(
        self, name: str, text: str, *, mode: int = FILE_MODE, kind: str = "report"
    ) -> str:
        return self.write_bytes(name, text.encode("utf-8"), mode=mode, kind=kind)

    def write_bytes(
        self, name: str, data: bytes, *, mode: int = FILE_MODE, kind: str = "report"
    ) -> str:
        """Write `name` whole (readers see the old file or the new one), never over a file
        the tool did not make; returns its path."""
        check_file_name(name)
        _check_kind(kind)
        with self._locked():
            ledger = self._read_ledger()
            existed = self._require_replaceable(name, ledger)
            temp, fd = self._create_temp(name)
            try:
                try:
                    _write_all(fd, data)
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                self._record_and_put(ledger, temp, name, _entry(kind, st), replace=existed)
            finally:
                self._discard(temp)
        self.sync()
        return self.join(name)

    def staging_name(self, name: str) -> str:
        """An unpredictable, unused name next to `name` for a writer that creates the file
        itself (qemu-img); hand it back to `publish`."""
        check_file_name(name)
        for _ in range(16):
            temp = _temp_name(name)
            if self.lstat(temp) is None:
                return temp
        raise OutputError(f"{self.join(name)}: no free temporary name", path=self.join(name))

    def publish(self, staged: str, name: str, *, mode: int, kind: str = DISK) -> FileIdentity:
        """Give the file at `staged` (made by this process's user) the name `name`, never
        over a file the tool did not make; returns the published file's identity."""
        check_file_name(staged)
        check_file_name(name)
        _check_kind(kind)
        with self._locked():
            ledger = self._read_ledger()
            existed = self._require_replaceable(name, ledger)
            st = self._seal_staged(staged, mode)
            self._record_and_put(ledger, staged, name, _entry(kind, st), replace=existed)
            self._discard(staged)
        self.sync()
        final = self.lstat(name)
        if final is None or (final.st_dev, final.st_ino) != (st.st_dev, st.st_ino):
            raise OutputError(f"{self.join(name)}: replaced while it was published")
        return FileIdentity.of(final)

    def remove_own(self, name: str) -> bool:
        """Remove one of the tool's files (False: there was none). Foreign files stay."""
        with self._locked():
            ledger = self._read_ledger()
            if not self._require_replaceable(name, ledger):
                return False
            os.unlink(name, dir_fd=self.fd)
            ledger.pop(name, None)
            self._write_ledger(ledger)
        self.sync()
        return True

    def discard_staged(self, staged: str) -> None:
        """Remove a staging file left by a failed writer, if it is there and ours by owner."""
        st = self.lstat(check_file_name(staged))
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            self._discard(staged)

    def sync(self) -> None:
        # A rename is durable only once the folder itself reaches the disk.
        os.fsync(self.fd)

    # --- internals ---

    def _foreign(self, name: str, why: str) -> ForeignFileError:
        path = self.join(name)
        return ForeignFileError(
            f"{path} exists and was not made by vmcraft-tasks ({why}); it is not replaced: "
            "move it away or choose another output_dir",
            path=path,
        )

    def _require_replaceable(self, name: str, ledger: dict[str, Any]) -> bool:
        """False: the name is free; True: it is the tool's own file. Else ForeignFileError."""
        st = self.lstat(name)
        if st is None:
            return False
        if _is_recorded(ledger.get(name), st):
            return True
        raise self._foreign(name, _describe(st))

    def _create_temp(self, name: str) -> tuple[str, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(16):
            temp = _temp_name(name)
            try:
                return temp, os.open(temp, flags, 0o600, dir_fd=self.fd)
            except FileExistsError:
                continue
        raise OutputError(f"{self.join(name)}: no free temporary name", path=self.join(name))

    def _seal_staged(self, staged: str, mode: int) -> os.stat_result:
        """Check a staged file is a plain file of ours with one name; set its mode, flush."""
        try:
            fd = os.open(staged, _OPEN_EXISTING, dir_fd=self.fd)
        except OSError as exc:
            raise OutputError(f"{self.join(staged)}: cannot open the staged file: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise OutputError(
                    f"{self.join(staged)}: the staged file is not a plain file of this tool",
                    path=self.join(staged),
                )
            os.fchmod(fd, mode)
            # qemu-img leaves data in the page cache: flush before the name is visible.
            os.fsync(fd)
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _record_and_put(
        self, ledger: dict[str, Any], temp: str, name: str, entry: dict[str, Any], *, replace: bool
    ) -> None:
        """Record the new file's identity, then give it its name.

        Recorded first, next to the identity of the file it replaces: a crash in between
        leaves the old file still recognised and an entry that matches nothing, never a
        file of the tool's that looks foreign. A failed publish drops the entry again, so
        no later file that reuses the inode number inherits it.
        """
        self._write_ledger(ledger, pending=(name, entry))
        try:
            self._put(temp, name, replace=replace)
        except BaseException:
            with contextlib.suppress(OSError, OutputError):
                self._write_ledger(ledger)
            raise

    def _put(self, temp: str, name: str, *, replace: bool) -> None:
        if replace:
            os.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            return
        try:
            # link() fails if the name appeared since the check; rename would replace it.
            os.link(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        except FileExistsError as exc:
            raise self._foreign(name, "it appeared while the tool was writing") from exc
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # File systems without hard links: check and rename are two steps here.
            if self.lstat(name) is not None:
                raise self._foreign(name, "it appeared while the tool was writing") from exc
            os.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def _discard(self, temp: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=self.fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise ledger updates of this folder across threads, processes and hosts."""
        with _thread_lock(os.fstat(self.fd)):
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=self.fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise self._foreign(LOCK_NAME, "a symlink") from exc
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise self._foreign(LOCK_NAME, _describe(st))
                _flock(fd, self.join(LOCK_NAME))
                yield
            finally:
                os.close(fd)  # releases the flock

    def _read_ledger(self) -> dict[str, Any]:
        try:
            fd = os.open(LEDGER_NAME, _OPEN_EXISTING, dir_fd=self.fd)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._foreign(LEDGER_NAME, "a symlink") from exc
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise self._foreign(LEDGER_NAME, _describe(st))
            if st.st_mode & 0o022:
                raise self._foreign(LEDGER_NAME, "writable by others")
            raw = _read_all(fd, MAX_LEDGER_BYTES)
        finally:
            os.close(fd)
        return _parse_ledger(raw, self.join(LEDGER_NAME))

    def _write_ledger(
        self, ledger: dict[str, Any], *, pending: tuple[str, dict[str, Any]] | None = None
    ) -> None:
        """Replace the ledger. Identities that no longer match the file at their name are
        dropped, so a reused inode number cannot inherit a stale entry; `pending` is the
        identity of a file about to be published under its name."""
        files: dict[str, list[dict[str, Any]]] = {}
        for name in sorted({*ledger, *([pending[0]] if pending else [])}):
            kept = [e for e in _entries(ledger.get(name)) if self._still_matches(name, e)]
            if pending is not None and name == pending[0]:
                kept = [pending[1], *kept]
            if kept:
                files[name] = kept
        data = json.dumps({"ledger_version": LEDGER_VERSION, "files": files}, indent=1) + "\n"
        temp, fd = self._create_temp(LEDGER_NAME)
        try:
            try:
                _write_all(fd, data.encode())
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, LEDGER_NAME, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        finally:
            self._discard(temp)

    def _still_matches(self, name: str, entry: dict[str, Any]) -> bool:
        try:
            st = self.lstat(name)
        except OutputNameError:
            return False
        return st is not None and _matches(entry, st)


def _open_child_dir(parent: int, part: str, shown: str, *, create: bool) -> int:
    """openat(parent, part) as a folder without following a symlink."""
    try:
        try:
            fd = os.open(part, _OPEN_DIR, dir_fd=parent)
            created = False
        except FileNotFoundError:
            if not create:
                raise MissingFolderError(f"{shown}: no such folder", path=shown) from None
            try:
                os.mkdir(part, DIR_MODE, dir_fd=parent)
                created = True
            except FileExistsError:  # another writer made it first: theirs to set
                created = False
            fd = os.open(part, _OPEN_DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutputPathError(
                f"{shown}: a symlink or not a folder; output folders must be reached "
                "without symlinks",
                path=shown,
            ) from exc
        raise OutputPathError(f"{shown}: cannot open: {exc.strerror}", path=shown) from exc
    st = os.fstat(fd)
    if created:
        os.fchmod(fd, DIR_MODE)  # exactly 0750, whatever the umask
    elif _other_writable(st):
        os.close(fd)
        raise OutputPathError(f"{shown}: writable by everyone (and not sticky)", path=shown)
    return fd


def _temp_name(name: str) -> str:
    # Hidden, unpredictable, and unlike any output name (VM ids never start with '.').
    return f".{name[:200]}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r} (one of {', '.join(sorted(KINDS))})")


def _flock(fd: int, shown: str) -> None:
    # Bounded: a planted or stuck holder must not hang a worker forever.
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OutputError(
                    f"{shown}: held by another writer for {LOCK_TIMEOUT_S:.0f} s", path=shown
                ) from None
            time.sleep(0.01)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
        if total > limit:
            raise OutputError(f"file larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_ledger(raw: bytes, shown: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputError(
            f"{shown}: unreadable ledger of the tool's files ({exc}); remove it only if "
            "no file in the folder is the tool's",
            path=shown,
        ) from exc
    return dict(files)
