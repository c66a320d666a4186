"""Small host-local files written whole and locked across processes.

Two helpers used by every host-local record (attach state, lease mirrors, step ledger,
conversion records, helper resources):

- `atomic_write`: a reader sees the old content or the new, never half a file. The
  data goes to a fresh temporary file in the same directory (opened
  `O_CREAT|O_EXCL|O_NOFOLLOW`, so nothing planted under that name is written through),
  optionally fsynced, then renamed over `path`. `rename` replaces whatever `path`
  names, a symlink included: the link is replaced, its target is never written.
- `locked`: an exclusive `flock` on a lock file opened `O_NOFOLLOW`. Each call opens
  its own file description, so the lock excludes other threads of this process as
  well as other processes; closing the descriptor drops it.

These are not for output files: those must never clobber (see `vmcraft_tasks.outfiles`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(path: str, data: bytes | str, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Replace `path` with `data` (str is written as UTF-8) in one step.

    `mode` is the new file's permission bits, as for `open` (the umask applies).
    `fsync`: flush the data to disk before the rename, so a power loss leaves the old
    or the new content and never an empty file. The directory must exist; errors are
    the `OSError`s of `open`/`write`/`rename`, and a failed write leaves no temporary
    file behind.
    """
    payload = data.encode() if isinstance(data, str) else data
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _TEMP_FLAGS, mode)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: str, *, blocking: bool = True, mode: int = 0o600) -> Iterator[int]:
    """Hold an exclusive `flock` on the lock file `path` (created with `mode` if absent).

    Yields the lock file's descriptor. `blocking=False` raises `BlockingIOError` at
    once when another holder has it. A symlink at `path` is refused (`OSError` ELOOP),
    never followed. The descriptor is close-on-exec: a helper process started under
    the lock does not keep holding it.
    """
    fd = os.open(path, _LOCK_FLAGS, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor drops the flock
