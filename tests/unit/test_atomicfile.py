"""atomic_write and locked, on real files and across real processes."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmcraft_tasks.craft.atomicfile import atomic_write, locked

# A second process tries the lock without blocking: prints "held" or "free".
_TRY_LOCK = """
import sys
from vmcraft_tasks.craft.atomicfile import locked
try:
    with locked(sys.argv[1], blocking=False):
        print("free")
except BlockingIOError:
    print("held")
"""


def _try_from_other_process(path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_writes_bytes_and_text(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    atomic_write(str(target), b"\x00\x01binary")
    assert target.read_bytes() == b"\x00\x01binary"
    atomic_write(str(target), "caf\u00e9")
    assert target.read_text(encoding="utf-8") == "caf\u00e9"


def test_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record"
    target.write_text("old content that is longer")
    atomic_write(str(target), "new", fsync=False)
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["record"]


def test_mode_applies_with_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a"), "x")
        atomic_write(str(tmp_path / "b"), "x", mode=0o600)
        atomic_write(str(tmp_path / "c"), "x", mode=0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o644


def test_symlink_at_path_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "record"
    link.symlink_to(victim)
    atomic_write(str(link), "mine")
    assert not link.is_symlink()
    assert link.read_text() == "mine"
    assert victim.read_text() == "precious"


def test_dangling_symlink_is_replaced(tmp_path: Path) -> None:
    link = tmp_path / "record"
    link.symlink_to(tmp_path / "elsewhere")
    atomic_write(str(link), "mine")
    assert not link.is_symlink()
    assert not (tmp_path / "elsewhere").exists()


def test_missing_directory_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(str(tmp_path / "nope" / "record"), "x")


def test_failed_replace_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "adir"
    target.mkdir()
    (target / "inside").write_text("keeps the directory non-empty")
    with pytest.raises(OSError):
        atomic_write(str(target), "x")  # rename of a file over a directory fails
    assert sorted(os.listdir(tmp_path)) == ["adir"]


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    path = tmp_path / "host.lock"
    with locked(str(path)) as fd:
        assert isinstance(fd, int)
        assert _try_from_other_process(path) == "held"
    assert _try_from_other_process(path) == "free"


def test_non_blocking_raises_when_held(tmp_path: Path) -> None:
    path = str(tmp_path / "host.lock")
    with locked(path), pytest.raises(BlockingIOError), locked(path, blocking=False):
        pass  # pragma: no cover
    with locked(path, blocking=False):
        pass  # free again once the first holder left


def test_blocking_waits_for_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "host.lock")
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.set()
        with locked(path):
            order.append("second")

    with locked(path):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(5)
        time.sleep(0.1)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


def test_lock_file_mode_and_symlink_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    old = os.umask(0o022)
    try:
        with locked(str(path)):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "b.lock"
    link.symlink_to(path)
    with pytest.raises(OSError) as err, locked(str(link)):
        pass  # pragma: no cover
    assert err.value.errno == errno.ELOOP
