"""GuestFS write helpers: atomic writes, link removal and mkdir -p, all inside the guest."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from vmcraft_tasks.craft import guestpath
from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.guestpath import DEFAULT_FILE_MODE, GuestFS


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("guest-passwd\n")
    return root


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    """A host file outside the guest root that guest symlinks try to reach."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host data")
    return secret


def _no_temporaries(directory: Path) -> bool:
    return not [name for name in os.listdir(directory) if name.startswith(".vmcraft-tmp.")]


def test_write_new_file_default_mode(guest: Path) -> None:
    GuestFS(str(guest)).write_file("/etc/new.conf", b"hello\n")
    path = guest / "etc" / "new.conf"
    assert path.read_bytes() == b"hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == DEFAULT_FILE_MODE
    assert _no_temporaries(guest / "etc")


def test_write_new_file_explicit_mode_ignores_umask(guest: Path) -> None:
    old = os.umask(0o077)
    try:
        GuestFS(str(guest)).write_file("/etc/x", b"", mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE((guest / "etc" / "x").stat().st_mode) == 0o640


def test_replace_keeps_mode_and_owner_and_swaps_inode(guest: Path) -> None:
    path = guest / "etc" / "secret.nmconnection"
    path.write_text("old")
    path.chmod(0o600)
    before = path.stat()
    GuestFS(str(guest)).write_file("/etc/secret.nmconnection", b"new")
    after = path.stat()
    assert path.read_text() == "new"
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    # A new inode renamed into place: readers see the old file or the new, never half.
    assert after.st_ino != before.st_ino
    assert _no_temporaries(guest / "etc")


def test_replace_keeps_extended_attributes(guest: Path) -> None:
    path = guest / "etc" / "labelled"
    path.write_text("old")
    try:
        os.setxattr(path, "user.vmcraft-test", b"label")
    except OSError as exc:
        pytest.skip(f"no user xattrs on this filesystem: {exc}")
    GuestFS(str(guest)).write_file("/etc/labelled", b"new")
    assert os.getxattr(path, "user.vmcraft-test") == b"label"


def test_final_symlink_to_host_file_is_replaced_not_followed(
    guest: Path, host_secret: Path
) -> None:
    link = guest / "etc" / "fstab"
    link.symlink_to(str(host_secret))
    GuestFS(str(guest)).write_file("/etc/fstab", b"guest data\n")
    assert host_secret.read_text() == "host data"
    assert not link.is_symlink()
    assert link.read_text() == "guest data\n"


def test_final_symlink_to_guest_file_is_replaced_target_kept(guest: Path) -> None:
    (guest / "etc" / "link").symlink_to("/etc/passwd")
    GuestFS(str(guest)).write_file("/etc/link", b"x")
    assert (guest / "etc" / "passwd").read_text() == "guest-passwd\n"
    assert not (guest / "etc" / "link").is_symlink()


def test_parent_symlinks_resolve_inside_the_guest(guest: Path) -> None:
    (guest / "conf").symlink_to("/etc")
    (guest / "up").symlink_to("../../../../..")
    fs = GuestFS(str(guest))
    fs.write_file("/conf/a", b"a")
    fs.write_file("/up/etc/b", b"b")
    fs.write_file("/../../../etc/c", b"c")
    for name in ("a", "b", "c"):
        assert (guest / "etc" / name).read_bytes() == name.encode()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/missing/file", "no such file"),
        ("/etc/passwd/file", "(?i)not a directory"),
        ("/etc", "is a directory"),
        ("/", "does not name an entry"),
        ("/etc/..", "does not name an entry"),
        ("/etc/a\0b", "NUL"),
    ],
)
def test_write_refusals(guest: Path, path: str, reason: str) -> None:
    with pytest.raises(GuestPathError, match=reason):
        GuestFS(str(guest)).write_file(path, b"x")


def test_write_refuses_fifo(guest: Path) -> None:
    os.mkfifo(guest / "etc" / "fifo")
    with pytest.raises(GuestPathError, match="not a regular file"):
        GuestFS(str(guest)).write_file("/etc/fifo", b"x")


def test_parent_swapped_for_host_symlink_is_not_followed(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (guest / "d").symlink_to(str(host_dir))
    # Simulate the race: resolution saw a directory, then it became a host symlink.
    monkeypatch.setattr(guestpath, "_walk", lambda *a, **k: ["d"])
    with pytest.raises(GuestPathError, match="cannot open the parent directory"):
        GuestFS(str(guest)).write_file("/d/x", b"x")
    assert os.listdir(host_dir) == []


def test_failed_write_leaves_old_file_and_no_temporary(
    guest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(guestpath, "_write_all", disk_full)
    with pytest.raises(GuestPathError, match="No space left"):
        GuestFS(str(guest)).write_file("/etc/passwd", b"new")
    assert (guest / "etc" / "passwd").read_text() == "guest-passwd\n"
    assert _no_temporaries(guest / "etc")


def test_case_insensitive_write_replaces_the_existing_spelling(guest: Path) -> None:
    (guest / "Windows").mkdir()
    (guest / "Windows" / "Setup.LOG").write_text("old")
    GuestFS(str(guest), case_insensitive=True).write_file("/windows/setup.log", b"new")
    assert os.listdir(guest / "Windows") == ["Setup.LOG"]
    assert (guest / "Windows" / "Setup.LOG").read_text() == "new"


def test_remove_file_and_symlinks_never_targets(guest: Path, host_secret: Path) -> None:
    (guest / "etc" / "to-guest").symlink_to("/etc/passwd")
    (guest / "etc" / "to-host").symlink_to(str(host_secret))
    (guest / "etc" / "dangling").symlink_to("/nowhere")
    (guest / "etc" / "plain").write_text("x")
    fs = GuestFS(str(guest))
    for name in ("to-guest", "to-host", "dangling", "plain"):
        fs.remove(f"/etc/{name}")
        assert not os.path.lexists(guest / "etc" / name)
    assert (guest / "etc" / "passwd").read_text() == "guest-passwd\n"
    assert host_secret.read_text() == "host data"


def test_remove_through_parent_link_stays_in_guest(guest: Path, tmp_path: Path) -> None:
    host_etc = tmp_path / "etc"
    host_etc.mkdir()
    (host_etc / "passwd").write_text("host passwd")
    # An absolute link that would name tmp_path/etc on the host is re-rooted.
    (guest / "alias").symlink_to(str(tmp_path))
    (guest / str(tmp_path).lstrip("/")).mkdir(parents=True)
    (guest / str(tmp_path).lstrip("/") / "etc").symlink_to("/etc")
    GuestFS(str(guest)).remove("/alias/etc/passwd")
    assert not (guest / "etc" / "passwd").exists()
    assert (host_etc / "passwd").read_text() == "host passwd"


def test_remove_refusals(guest: Path) -> None:
    fs = GuestFS(str(guest))
    with pytest.raises(GuestPathError, match="cannot remove"):
        fs.remove("/etc")
    with pytest.raises(GuestPathError, match="cannot remove"):
        fs.remove("/etc/missing")


def test_makedirs_creates_missing_levels_with_exact_mode(guest: Path) -> None:
    fs = GuestFS(str(guest))
    old = os.umask(0o077)
    try:
        fs.makedirs("/etc/dracut.conf.d/deeper")
    finally:
        os.umask(old)
    for path in (guest / "etc" / "dracut.conf.d", guest / "etc" / "dracut.conf.d" / "deeper"):
        assert path.is_dir()
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    fs.makedirs("/etc/dracut.conf.d")  # existing: fine, like mkdir -p


def test_makedirs_follows_guest_links_and_clamps(guest: Path, tmp_path: Path) -> None:
    (guest / "etc" / "alt").symlink_to("/etc")
    (guest / "host").symlink_to(str(tmp_path))  # re-rooted: not the host tmp_path
    fs = GuestFS(str(guest))
    fs.makedirs("/etc/alt/new/dir")
    fs.makedirs("/../../x/../y")
    assert (guest / "etc" / "new" / "dir").is_dir()
    assert (guest / "y").is_dir()
    with pytest.raises(GuestPathError):
        fs.makedirs("/host/created")  # the link dangles inside the guest
    assert not (tmp_path / "created").exists()


def test_makedirs_refuses_file_and_dangling_link_in_the_way(guest: Path) -> None:
    (guest / "dangling").symlink_to("/nowhere")
    fs = GuestFS(str(guest))
    with pytest.raises(GuestPathError):
        fs.makedirs("/etc/passwd/sub")
    with pytest.raises(GuestPathError):
        fs.makedirs("/dangling/sub")
    assert not (guest / "nowhere").exists()


def test_lstat_and_is_symlink(guest: Path, host_secret: Path) -> None:
    (guest / "etc" / "link").symlink_to(str(host_secret))
    (guest / "bin").symlink_to("etc")
    fs = GuestFS(str(guest))
    assert stat.S_ISLNK(fs.lstat("/etc/link").st_mode)
    assert fs.is_symlink("/etc/link") and fs.is_symlink("/bin")
    # The parent link is followed, the final component is not.
    assert fs.is_symlink("/bin/link")
    assert stat.S_ISREG(fs.lstat("/bin/passwd").st_mode)
    assert not fs.is_symlink("/etc/passwd")
    assert not fs.is_symlink("/etc/missing")
    with pytest.raises(GuestPathError, match="cannot stat"):
        fs.lstat("/etc/missing")
