"""Guest path resolution must never leave the guest root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmcraft_tasks.craft import guestpath
from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.guestpath import MAX_SYMLINKS, GuestFS, resolve


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("guest-passwd\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "ls").write_bytes(b"guest-ls")
    (root / "bin").symlink_to("usr/bin")
    (root / "a" / "b").mkdir(parents=True)
    return root


def test_plain_file_resolves_under_root(guest: Path) -> None:
    assert resolve(str(guest), "/etc/passwd") == str(guest / "etc" / "passwd")
    assert resolve(str(guest), "etc/passwd") == str(guest / "etc" / "passwd")


def test_relative_directory_symlink_is_followed(guest: Path) -> None:
    assert resolve(str(guest), "/bin/ls") == str(guest / "usr" / "bin" / "ls")
    assert GuestFS(str(guest)).read_file("/bin/ls") == b"guest-ls"


def test_absolute_symlink_to_host_file_is_rerooted(guest: Path) -> None:
    (guest / "etc" / "link").symlink_to("/etc/passwd")
    fs = GuestFS(str(guest))
    assert fs.resolve("/etc/link") == str(guest / "etc" / "passwd")
    assert fs.cat("/etc/link") == "guest-passwd\n"


def test_relative_symlink_climbing_out_is_clamped(guest: Path) -> None:
    (guest / "a" / "b" / "up").symlink_to("../../../../../../../../etc/passwd")
    assert resolve(str(guest), "/a/b/up") == str(guest / "etc" / "passwd")


def test_dotdot_in_guest_path_is_clamped(guest: Path) -> None:
    assert resolve(str(guest), "/../../../etc/passwd") == str(guest / "etc" / "passwd")
    assert resolve(str(guest), "a/b/../../../../etc/./passwd") == str(guest / "etc" / "passwd")


def test_dotdot_after_symlink_uses_the_link_target(guest: Path) -> None:
    # /bin -> usr/bin, so /bin/.. is /usr (POSIX), not the root.
    assert resolve(str(guest), "/bin/..") == str(guest / "usr")


def test_symlink_to_host_only_path_is_missing_not_the_host_file(
    guest: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host data")
    (guest / "steal").symlink_to(str(secret))
    fs = GuestFS(str(guest))
    with pytest.raises(GuestPathError) as info:
        fs.read_file("/steal")
    assert "no such file" in info.value.reason
    assert fs.exists("/steal") is False


def test_directory_symlink_to_slash_lists_guest_root(guest: Path) -> None:
    (guest / "hostroot").symlink_to("/")
    fs = GuestFS(str(guest))
    assert fs.ls("/hostroot") == sorted(os.listdir(guest))
    assert fs.ls("/hostroot") != sorted(os.listdir("/"))
    assert fs.cat("/hostroot/etc/passwd") == "guest-passwd\n"


def test_symlink_loop_is_an_error(guest: Path) -> None:
    (guest / "loop1").symlink_to("loop2")
    (guest / "loop2").symlink_to("/loop1")
    with pytest.raises(GuestPathError) as info:
        resolve(str(guest), "/loop1")
    assert "too many levels of symbolic links" in info.value.reason
    assert GuestFS(str(guest)).exists("/loop1") is False


def test_self_loop_through_directory_is_an_error(guest: Path) -> None:
    (guest / "self").symlink_to("self/x")
    with pytest.raises(GuestPathError, match="too many levels"):
        resolve(str(guest), "/self")


def test_chain_of_exactly_max_links_resolves_one_more_fails(guest: Path) -> None:
    (guest / "link0").symlink_to("etc/passwd")
    for i in range(1, MAX_SYMLINKS + 1):
        (guest / f"link{i}").symlink_to(f"link{i - 1}")
    assert resolve(str(guest), f"/link{MAX_SYMLINKS - 1}") == str(guest / "etc" / "passwd")
    with pytest.raises(GuestPathError, match="too many levels"):
        resolve(str(guest), f"/link{MAX_SYMLINKS}")


def test_missing_path_raises_with_reason(guest: Path) -> None:
    with pytest.raises(GuestPathError) as info:
        resolve(str(guest), "/etc/nope/deeper")
    assert info.value.path == "/etc/nope/deeper"
    assert info.value.reason == "no such file or directory: /etc/nope"


def test_file_used_as_directory_raises(guest: Path) -> None:
    with pytest.raises(GuestPathError) as info:
        resolve(str(guest), "/etc/passwd/x")
    assert info.value.reason == "not a directory: /etc/passwd"


def test_nul_byte_and_bad_root_are_errors(guest: Path) -> None:
    with pytest.raises(GuestPathError, match="NUL"):
        resolve(str(guest), "/etc/pass\0wd")
    with pytest.raises(GuestPathError, match="not a directory"):
        GuestFS(str(guest / "etc" / "passwd"))


def test_exists_is_file_is_dir(guest: Path) -> None:
    (guest / "dangling").symlink_to("/does/not/exist")
    fs = GuestFS(str(guest))
    assert fs.exists("/etc/passwd") and fs.is_file("/etc/passwd")
    assert not fs.is_dir("/etc/passwd")
    assert fs.is_dir("/bin") and not fs.is_file("/bin")
    assert fs.is_dir("/")
    assert not fs.exists("/dangling")
    assert not fs.exists("/missing")


def test_ls_is_sorted_names(guest: Path) -> None:
    for name in ("zeta", "alpha", "Mid"):
        (guest / "etc" / name).write_text("")
    assert GuestFS(str(guest)).ls("/etc") == ["Mid", "alpha", "passwd", "zeta"]


def test_ls_of_a_file_is_an_error(guest: Path) -> None:
    with pytest.raises(GuestPathError, match="cannot open"):
        GuestFS(str(guest)).ls("/etc/passwd")


def test_read_file_size_cap(guest: Path) -> None:
    (guest / "big").write_bytes(b"x" * 100)
    fs = GuestFS(str(guest))
    assert fs.read_file("/big", max_size=100) == b"x" * 100
    with pytest.raises(GuestPathError, match="cap"):
        fs.read_file("/big", max_size=99)
    assert fs.head("/big", 10) == b"x" * 10


def test_read_file_refuses_directories_and_fifos(guest: Path) -> None:
    os.mkfifo(guest / "fifo")
    fs = GuestFS(str(guest))
    with pytest.raises(GuestPathError, match="not a regular file"):
        fs.read_file("/fifo")
    with pytest.raises(GuestPathError):
        fs.read_file("/etc")
    with pytest.raises(GuestPathError):
        fs.read_file("/")


def test_cat_replaces_invalid_utf8(guest: Path) -> None:
    (guest / "bad").write_bytes(b"ok\xff\xfe")
    assert GuestFS(str(guest)).cat("/bad") == "ok\ufffd\ufffd"


def test_readlink_returns_raw_target(guest: Path) -> None:
    (guest / "etc" / "link").symlink_to("/etc/passwd")
    fs = GuestFS(str(guest))
    assert fs.readlink("/bin") == "usr/bin"
    # The parent is followed, the final link is not.
    assert fs.readlink("/bin/../../etc/link") == "/etc/passwd"
    with pytest.raises(GuestPathError, match="not a symbolic link"):
        fs.readlink("/etc/passwd")


def test_realpath_is_the_guest_view(guest: Path) -> None:
    (guest / "etc" / "link").symlink_to("../bin/ls")
    assert GuestFS(str(guest)).realpath("/etc/link") == "/usr/bin/ls"


def test_case_insensitive_lookup(guest: Path) -> None:
    (guest / "Windows" / "System32").mkdir(parents=True)
    (guest / "Windows" / "System32" / "cmd.exe").write_bytes(b"MZ")
    assert not GuestFS(str(guest)).exists("/WINDOWS/system32/CMD.EXE")
    fs = GuestFS(str(guest), case_insensitive=True)
    assert fs.is_file("/WINDOWS/system32/CMD.EXE")
    assert fs.realpath("/windows/SYSTEM32") == "/Windows/System32"


def test_final_component_swapped_for_symlink_is_not_followed(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate the race: resolution saw a plain file, then it became a host symlink.
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host data")
    (guest / "etc" / "swapped").symlink_to(str(secret))
    monkeypatch.setattr(guestpath, "_walk", lambda *a, **k: ["etc", "swapped"])
    with pytest.raises(GuestPathError, match="cannot open"):
        GuestFS(str(guest)).read_file("/etc/swapped")


def test_directory_swapped_for_symlink_is_not_followed(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (host_dir / "secret").write_text("host data")
    (guest / "d").symlink_to(str(host_dir))
    monkeypatch.setattr(guestpath, "_walk", lambda *a, **k: ["d", "secret"])
    with pytest.raises(GuestPathError, match="cannot open"):
        GuestFS(str(guest)).read_file("/d/secret")
