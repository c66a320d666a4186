"""Guest paths resolved inside a mounted guest root, so nothing can escape to the host.

A guest filesystem is hostile input: its symlinks were written by someone else and
mean something only inside the guest. `/etc/passwd -> /etc/passwd` or `lib -> ../../..`
must land inside the guest root, never on the host. So we walk the path one component
at a time, read each symlink ourselves, re-root absolute targets at the guest root and
clamp `..` there. `os.path.realpath` on the joined path would follow links with host
semantics, which is exactly the escape we are preventing.

Opening then walks the resolved components again with `dir_fd` and `O_NOFOLLOW`, so a
directory swapped for a symlink between resolution and open fails instead of escaping.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from vmcraft_tasks.craft.errors import GuestPathError

# The same limit the Linux kernel applies (MAXSYMLINKS), so a guest that boots
# resolves the same paths we do.
MAX_SYMLINKS = 40
DEFAULT_READ_CAP = 16 * 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK so a FIFO planted by the guest cannot hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


def _host_root(root: str) -> str:
    # Canonicalising the root itself is safe: it is a host path we chose, not guest data.
    host = os.path.realpath(root)
    if not os.path.isdir(host):
        raise GuestPathError("/", f"guest root {root!r} is not a directory")
    return host


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _find_casefold(directory: str, name: str) -> str | None:
    """The entry of `directory` equal to `name` ignoring case (NTFS semantics)."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return None
    wanted = name.casefold()
    for entry in entries:
        if entry.casefold() == wanted:
            return entry
    return None


def _shown(resolved: list[str], name: str) -> str:
    return "/" + "/".join([*resolved, name])


def _walk(root: str, guest_path: str, *, follow_final: bool, case_insensitive: bool) -> list[str]:
    """Resolve `guest_path` to components under `root` (a canonical host directory).

    Every returned component exists and, except possibly the last when
    `follow_final` is false, is not a symlink.
    """
    if "\0" in guest_path:
        raise GuestPathError(guest_path, "contains a NUL byte")
    resolved: list[str] = []
    pending = _components(guest_path)
    pending.reverse()  # a stack: pop() takes the next component
    links = 0
    while pending:
        name = pending.pop()
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        parent = os.path.join(root, *resolved)
        candidate = os.path.join(parent, name)
        st = _lstat(candidate)
        if st is None and case_insensitive:
            match = _find_casefold(parent, name)
            if match is not None:
                name = match
                candidate = os.path.join(parent, name)
                st = _lstat(candidate)
        if st is None:
            raise GuestPathError(guest_path, f"no such file or directory: {_shown(resolved, name)}")
        is_last = not pending
        if stat.S_ISLNK(st.st_mode) and (follow_final or not is_last):
            links += 1
            if links > MAX_SYMLINKS:
                raise GuestPathError(
                    guest_path, f"too many levels of symbolic links (> {MAX_SYMLINKS})"
                )
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed(_components(target)))
            continue
        if not is_last and not stat.S_ISDIR(st.st_mode):
            raise GuestPathError(guest_path, f"not a directory: {_shown(resolved, name)}")
        resolved.append(name)
    return resolved


def resolve(root: str, guest_path: str, *, case_insensitive: bool = False) -> str:
    """Host path of `guest_path` inside the guest mounted at `root`, symlinks followed.

    The result is always `root` or below it. A missing component, a symlink loop or
    a file used as a directory raises `GuestPathError`.
    """
    host_root = _host_root(root)
    parts = _walk(host_root, guest_path, follow_final=True, case_insensitive=case_insensitive)
    return os.path.join(host_root, *parts)


def _open_parts(root: str, parts: list[str], final_flags: int) -> int:
    """Open `root/parts...` one component at a time, refusing symlinks at every step."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for index, name in enumerate(parts):
            flags = final_flags if index == len(parts) - 1 else _DIR_FLAGS
            next_fd = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        if not parts and final_flags != _DIR_FLAGS:
            raise IsADirectoryError(errno.EISDIR, "is the guest root")
    except BaseException:
        os.close(fd)
        raise
    return fd


class GuestFS:
    """Read-only access to a guest tree mounted at `root`, confined to it.

    `case_insensitive` matches components ignoring case when no exact match exists,
    which is how Windows paths must be looked up on an NTFS mount.
    """

    def __init__(self, root: str, *, case_insensitive: bool = False) -> None:
        self.root = _host_root(root)
        self.case_insensitive = case_insensitive

    def _parts(self, path: str, *, follow_final: bool = True) -> list[str]:
        return _walk(
            self.root, path, follow_final=follow_final, case_insensitive=self.case_insensitive
        )

    def resolve(self, path: str) -> str:
        """Host path of a guest path; see the module-level `resolve`."""
        return os.path.join(self.root, *self._parts(path))

    def realpath(self, path: str) -> str:
        """The canonical guest path (as the guest would see it) of `path`."""
        return "/" + "/".join(self._parts(path))

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.resolve(path))
        except (GuestPathError, OSError):
            return None

    def exists(self, path: str) -> bool:
        """True if `path` resolves; dangling links and link loops do not."""
        return self._stat(path) is not None

    def is_file(self, path: str) -> bool:
        st = self._stat(path)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_dir(self, path: str) -> bool:
        st = self._stat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    @contextmanager
    def _open(self, path: str, flags: int) -> Iterator[int]:
        parts = self._parts(path)
        try:
            fd = _open_parts(self.root, parts, flags)
        except OSError as exc:
            raise GuestPathError(path, f"cannot open: {exc.strerror or exc}") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def ls(self, path: str) -> list[str]:
        """Sorted entry names of the guest directory `path`."""
        with self._open(path, _DIR_FLAGS) as fd:
            try:
                return sorted(os.listdir(fd))
            except OSError as exc:
                raise GuestPathError(path, f"cannot list: {exc.strerror or exc}") from exc

    def read_file(self, path: str, *, max_size: int = DEFAULT_READ_CAP) -> bytes:
        """Whole content of a regular guest file; larger than `max_size` is an error."""
        with self._open(path, _FILE_FLAGS) as fd:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GuestPathError(path, "not a regular file")
            if st.st_size > max_size:
                raise GuestPathError(path, f"larger than the {max_size}-byte cap ({st.st_size})")
            # Read one byte past the cap so a file growing after fstat is still refused.
            data = _read_up_to(fd, max_size + 1)
            if len(data) > max_size:
                raise GuestPathError(path, f"larger than the {max_size}-byte cap")
            return data

    def head(self, path: str, size: int = 4096) -> bytes:
        """The first `size` bytes of a regular guest file (fewer if it is shorter)."""
        with self._open(path, _FILE_FLAGS) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise GuestPathError(path, "not a regular file")
            return _read_up_to(fd, size)

    def cat(self, path: str, *, max_size: int = DEFAULT_READ_CAP) -> str:
        """A guest text file decoded as UTF-8; undecodable bytes become U+FFFD."""
        return self.read_file(path, max_size=max_size).decode("utf-8", errors="replace")

    def readlink(self, path: str) -> str:
        """The raw target of the guest symlink `path` (guest semantics, not resolved)."""
        parts = self._parts(path, follow_final=False)
        host = os.path.join(self.root, *parts)
        try:
            return os.readlink(host)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise GuestPathError(path, "not a symbolic link") from exc
            raise GuestPathError(path, f"cannot read link: {exc.strerror or exc}") from exc


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
