"""Guest paths resolved inside a mounted guest root, so nothing can escape to the host.

A guest filesystem is hostile input: its symlinks were written by someone else and
mean something only inside the guest. `/etc/passwd -> /etc/passwd` or `lib -> ../../..`
must land inside the guest root, never on the host. So we walk the path one component
at a time, read each symlink ourselves, re-root absolute targets at the guest root and
clamp `..` there. `os.path.realpath` on the joined path would follow links with host
semantics, which is exactly the escape we are preventing.

Opening then walks the resolved components again with `dir_fd` and `O_NOFOLLOW`, so a
directory swapped for a symlink between resolution and open fails instead of escaping.

Writes resolve the PARENT the same way and then act on the final name relative to the
opened parent directory (`*at` system calls): a symlink at the final component is
replaced or removed itself, never followed, so a guest link to `/etc/passwd` cannot
make us write the host's file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from vmcraft_tasks.craft.errors import GuestPathError

# The same limit the Linux kernel applies (MAXSYMLINKS), so a guest that boots
# resolves the same paths we do.
MAX_SYMLINKS = 40
DEFAULT_READ_CAP = 16 * 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK so a FIFO planted by the guest cannot hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# O_EXCL together with O_NOFOLLOW: the temporary name must be new, never a planted link.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
# Hidden and recognisable, so a temporary left by a crash is easy to spot in the guest.
_TEMP_PREFIX = ".vmcraft-tmp."


class TooManyEntries(GuestPathError):
    """A guest directory holds more entries than the caller's limit (see `GuestFS.ls`)."""

    def __init__(self, path: str, limit: int) -> None:
        self.limit = limit
        super().__init__(path, f"more than {limit} entries")


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
    """Access to a guest tree mounted at `root`, confined to it.

    Reads follow guest symlinks (re-rooted inside the guest); the write helpers
    (`write_file`, `remove`, `makedirs`) never follow a symlink at the final component.

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

    def ls(self, path: str, *, limit: int | None = None) -> list[str]:
        """Sorted entry names of the guest directory `path`.

        With `limit`, a directory holding more entries raises `TooManyEntries` after
        reading at most `limit + 1` of them: a guest with a million files in one
        directory then costs a bounded read, not a million-name list.
        """
        with self._open(path, _DIR_FLAGS) as fd:
            try:
                if limit is None:
                    return sorted(os.listdir(fd))
                names: list[str] = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if len(names) >= limit:
                            raise TooManyEntries(path, limit)
                        names.append(entry.name)
                return sorted(names)
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

    # -- writes -------------------------------------------------------------------

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """An open fd of the resolved parent directory of `path`, and the final name.

        The parent follows guest symlinks (inside the guest); the final name is left
        for the caller to act on relative to the fd, so it is never followed.
        """
        if "\0" in path:
            raise GuestPathError(path, "contains a NUL byte")
        names = _components(path)
        if not names or names[-1] == "..":
            raise GuestPathError(path, "does not name an entry of a directory")
        parts = self._parts("/" + "/".join(names[:-1]))
        try:
            fd = _open_parts(self.root, parts, _DIR_FLAGS)
        except OSError as exc:
            raise GuestPathError(
                path, f"cannot open the parent directory: {exc.strerror or exc}"
            ) from exc
        try:
            name = names[-1]
            if self.case_insensitive and _lstat_at(fd, name) is None:
                name = _find_casefold_at(fd, name) or name
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result:
        """Status of `path` itself: a final symlink is described, not followed."""
        with self._parent(path) as (fd, name):
            try:
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                raise GuestPathError(path, f"cannot stat: {exc.strerror or exc}") from exc

    def is_symlink(self, path: str) -> bool:
        """True if `path` itself is a symlink (dangling or not)."""
        try:
            return stat.S_ISLNK(self.lstat(path).st_mode)
        except GuestPathError:
            return False

    def write_file(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Atomically make `path` a regular file holding `data`.

        The data goes to a temporary file in the same guest directory, which is then
        renamed over `path`, so a crash leaves the old file or the new one, never half
        of one. A symlink at `path` is replaced by the file, never followed.

        Replacing a regular file keeps its permission bits, owner and extended
        attributes (SELinux labels, ACLs; best effort: the host may refuse some) unless
        `mode` is given; a new file gets `mode` or DEFAULT_FILE_MODE. Network configs
        such as NetworkManager keyfiles must stay 0600, hence the default of keeping.
        """
        with self._parent(path) as (dir_fd, name):
            old = _lstat_at(dir_fd, name)
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise GuestPathError(path, "is a directory")
            if old is not None and not (stat.S_ISREG(old.st_mode) or stat.S_ISLNK(old.st_mode)):
                raise GuestPathError(path, "exists and is not a regular file or a symlink")
            keep = old if old is not None and stat.S_ISREG(old.st_mode) else None
            if mode is None:
                mode = stat.S_IMODE(keep.st_mode) if keep is not None else DEFAULT_FILE_MODE
            temp = _TEMP_PREFIX + secrets.token_hex(8)
            try:
                fd = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
            except OSError as exc:
                raise GuestPathError(path, f"cannot create: {exc.strerror or exc}") from exc
            try:
                try:
                    _write_all(fd, data)
                    if keep is not None:
                        _copy_owner_and_xattrs(dir_fd, name, keep, fd)
                    # After chown, which clears set-id bits; explicit, so umask has no say.
                    os.fchmod(fd, mode & 0o7777)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                with suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise GuestPathError(path, f"cannot write: {exc.strerror or exc}") from exc
            except BaseException:
                with suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
            # The rename is only durable once the directory itself is on disk.
            with suppress(OSError):
                os.fsync(dir_fd)

    def remove(self, path: str) -> None:
        """Remove the file or symlink `path`; a symlink's target is never touched."""
        with self._parent(path) as (dir_fd, name):
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise GuestPathError(path, f"cannot remove: {exc.strerror or exc}") from exc

    def makedirs(self, path: str, *, mode: int = DEFAULT_DIR_MODE) -> None:
        """Create `path` and any missing parents inside the guest, like `mkdir -p`.

        Existing components may be guest symlinks to directories (followed inside the
        guest); a dangling symlink or a file in the way is an error.
        """
        if "\0" in path:
            raise GuestPathError(path, "contains a NUL byte")
        done: list[str] = []
        for name in _components(path):
            if name != "..":
                with self._parent("/" + "/".join([*done, name])) as (dir_fd, entry):
                    if _lstat_at(dir_fd, entry) is None:
                        self._mkdir_at(path, dir_fd, entry, mode)
            done.append(name)
            # Resolving the prefix checks it is (or links to) a directory in the guest.
            here = "/" + "/".join(done)
            if not self.is_dir(here):
                raise GuestPathError(path, f"not a directory: {here}")

    @staticmethod
    def _mkdir_at(path: str, dir_fd: int, name: str, mode: int) -> None:
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise GuestPathError(path, f"cannot create directory: {exc.strerror or exc}") from exc
        try:
            os.fchmod(fd, mode & 0o7777)  # exact, whatever the umask
        finally:
            os.close(fd)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _find_casefold_at(dir_fd: int, name: str) -> str | None:
    try:
        entries = sorted(os.listdir(dir_fd))
    except OSError:
        return None
    wanted = name.casefold()
    return next((entry for entry in entries if entry.casefold() == wanted), None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_owner_and_xattrs(dir_fd: int, name: str, old: os.stat_result, new_fd: int) -> None:
    """Give the new inode the owner and extended attributes of the file it replaces."""
    st = os.fstat(new_fd)
    if (st.st_uid, st.st_gid) != (old.st_uid, old.st_gid):
        os.fchown(new_fd, old.st_uid, old.st_gid)
    try:
        old_fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return
    try:
        if os.fstat(old_fd).st_ino != old.st_ino:
            return  # swapped since we looked: not the file we are replacing
        for attr in os.listxattr(old_fd):
            # Best effort: a host with its own SELinux policy may reject a guest label,
            # and a filesystem may not support an attribute at all.
            with suppress(OSError):
                os.setxattr(new_fd, attr, os.getxattr(old_fd, attr))
    except OSError:
        pass
    finally:
        os.close(old_fd)


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
