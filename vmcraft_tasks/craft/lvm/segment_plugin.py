"""nbdkit python plugin: one LV served from its segments' byte ranges on the PV devices.

Started by `craft.lvm.expose` as `nbdkit [-r] python segment_plugin.py map=FILE`.
FILE (JSON) holds `{"size": N, "extents": [{"start", "length", "path", "offset"}]}`:
LV bytes [start, start+length) live in `path` from byte `offset`. Bytes no extent
covers read as zeros and refuse writes. Read-only unless nbdkit runs without `-r`
and the map says `"writable": true`.

It runs inside nbdkit's own Python: standard library only, no vmcraft import.
`resolve()` is pure and unit-tested on its own.
"""

from __future__ import annotations

import bisect
import builtins
import errno
import json
import os
import threading
from typing import Any

API_VERSION = 2

_map: dict[str, Any] = {}


def config(key: str, value: str) -> None:
    if key != "map":
        raise RuntimeError(f"unknown parameter {key!r} (only map=FILE)")
    with builtins.open(value) as fh:
        loaded = json.load(fh)
    extents = sorted(loaded["extents"], key=lambda e: int(e["start"]))
    end = 0
    for extent in extents:
        if int(extent["start"]) < end or int(extent["length"]) <= 0:
            raise RuntimeError(f"overlapping or empty extent in {value}: {extent}")
        end = int(extent["start"]) + int(extent["length"])
    if end > int(loaded["size"]):
        raise RuntimeError(f"extents end at {end}, beyond the size {loaded['size']}")
    _map.update(
        size=int(loaded["size"]),
        extents=extents,
        starts=[int(e["start"]) for e in extents],
        writable=bool(loaded.get("writable", False)),
    )


def config_complete() -> None:
    if not _map:
        raise RuntimeError("map=FILE is required")


def thread_model() -> int:
    import nbdkit  # type: ignore[import-not-found]  # nbdkit's embedded module

    return int(nbdkit.THREAD_MODEL_PARALLEL)


def resolve(
    extents: list[dict[str, Any]], starts: list[int], offset: int, length: int
) -> list[tuple[int, int, str | None, int]]:
    """Split [offset, offset+length) of the LV into pieces (pure).

    Each piece is (position in the request, length, path or None for a gap, offset in
    path). `starts` is the sorted list of the extents' start offsets.
    """
    pieces: list[tuple[int, int, str | None, int]] = []

    def end_of(i: int) -> int:
        return int(extents[i]["start"]) + int(extents[i]["length"])

    pos, end = offset, offset + length
    # i: the first extent that ends after pos (extents are sorted and disjoint)
    i = bisect.bisect_right(starts, pos) - 1
    if i < 0 or pos >= end_of(i):
        i += 1
    while pos < end:
        if i < len(extents) and starts[i] <= pos:
            n = min(end, end_of(i)) - pos
            source = int(extents[i]["offset"]) + pos - starts[i]
            pieces.append((pos - offset, n, str(extents[i]["path"]), source))
            i += 1
        else:
            n = min(end, starts[i] if i < len(extents) else end) - pos
            pieces.append((pos - offset, n, None, 0))
        pos += n
    return pieces


class _Handle:
    def __init__(self, readonly: bool) -> None:
        self.readonly = readonly or not _map["writable"]
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()

    def fd(self, path: str) -> int:
        with self.lock:
            if path not in self.fds:
                flags = os.O_RDONLY if self.readonly else os.O_RDWR
                self.fds[path] = os.open(path, flags | os.O_CLOEXEC)
            return self.fds[path]


def open(readonly: bool) -> _Handle:  # nbdkit looks this name up (shadows the builtin)
    return _Handle(readonly)


def close(h: _Handle) -> None:
    for fd in h.fds.values():
        os.close(fd)
    h.fds.clear()


def get_size(h: _Handle) -> int:
    return int(_map["size"])


def can_write(h: _Handle) -> bool:
    return not h.readonly


def can_flush(h: _Handle) -> bool:
    return True


def can_multi_conn(h: _Handle) -> bool:
    return True


def pread(h: _Handle, buf: Any, offset: int, flags: int) -> None:
    view = memoryview(buf)
    for pos, n, path, src in resolve(_map["extents"], _map["starts"], offset, len(buf)):
        if path is None:
            view[pos : pos + n] = bytes(n)
            continue
        done = 0
        while done < n:
            data = os.pread(h.fd(path), n - done, src + done)
            if not data:
                raise OSError(errno.EIO, f"short read from {path} at {src + done}")
            view[pos + done : pos + done + len(data)] = data
            done += len(data)


def pwrite(h: _Handle, buf: Any, offset: int, flags: int) -> None:
    if h.readonly:
        raise OSError(errno.EROFS, "read-only LV")
    view = memoryview(buf)
    for pos, n, path, dst in resolve(_map["extents"], _map["starts"], offset, len(buf)):
        if path is None:
            raise OSError(errno.EIO, f"write to unmapped LV bytes at {offset + pos}")
        done = 0
        while done < n:
            done += os.pwrite(h.fd(path), view[pos + done : pos + n], dst + done)


def flush(h: _Handle, flags: int) -> None:
    for fd in list(h.fds.values()):
        os.fsync(fd)
