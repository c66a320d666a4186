"""Confined output folders and safe output files: real files, folders and symlinks."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks import outfiles
from vmcraft_tasks.outfiles import (
    LEDGER_NAME,
    LOCK_NAME,
    ForeignFileError,
    MissingFolderError,
    OutputDir,
    OutputNameError,
    OutputPathError,
    check_output_dir,
    check_vm_id,
    output_mode,
    output_roots_for,
    system_folder_reason,
    vm_id_problem,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path.resolve() / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the root standing in for /etc: nothing may ever land in it."""
    path = tmp_path.resolve() / "etc"
    path.mkdir()
    (path / "shadow").write_text("root:secret\n")
    return path


@pytest.fixture
def out(root: Path) -> Iterator[OutputDir]:
    with OutputDir.open(str(root / "wave-1"), [str(root)]) as opened:
        yield opened


def visible(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if not p.startswith("."))


def ledger(folder: Path) -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = json.loads((folder / LEDGER_NAME).read_text())["files"]
    return files


# --- check_output_dir -----------------------------------------------------------------


def test_a_folder_under_the_root_is_returned_as_used(root: Path) -> None:
    assert check_output_dir(f"{root}/a/../wave-1", [str(root)]) == f"{root}/wave-1"
    assert check_output_dir(str(root), [str(root)]) == str(root)


def test_outside_every_root(root: Path, outside: Path) -> None:
    with pytest.raises(OutputPathError, match=r"outside the output roots \(.*/root\)"):
        check_output_dir(str(outside), [str(root)])


def test_a_root_given_through_a_symlink_is_resolved(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "root-link"
    link.symlink_to(root)
    assert check_output_dir(f"{link}/x", [str(link)]) == f"{root}/x"
    assert check_output_dir(f"{root}/x", [str(link)]) == f"{root}/x"


def test_a_symlink_out_of_the_root_is_refused(root: Path, outside: Path) -> None:
    (root / "out").symlink_to(outside)
    with pytest.raises(OutputPathError, match=r"out is a symlink \(to .*/etc\)"):
        check_output_dir(f"{root}/out", [str(root)])
    with pytest.raises(OutputPathError, match="is a symlink"):
        check_output_dir(f"{root}/out/deeper", [str(root)])


def test_a_symlinked_component_inside_the_root_is_refused(root: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to("real")
    with pytest.raises(OutputPathError, match="is a symlink"):
        check_output_dir(f"{root}/alias/x", [str(root)])


def test_a_file_in_the_way_is_not_a_folder(root: Path) -> None:
    (root / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is not a folder"):
        check_output_dir(f"{root}/file/x", [str(root)])


def test_a_folder_anyone_can_write_is_refused_unless_sticky(root: Path) -> None:
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OutputPathError, match="writable by everyone"):
        check_output_dir(f"{shared}/x", [str(root)])
    shared.chmod(0o1777)  # like /tmp: others cannot rename our files
    assert check_output_dir(f"{shared}/x", [str(root)]) == f"{shared}/x"


@pytest.mark.parametrize("bad", ["relative/x", "", "/x\0y"])
def test_invalid_paths(root: Path, bad: str) -> None:
    with pytest.raises(OutputPathError):
        check_output_dir(bad, [str(root)])


def test_no_roots_no_output(root: Path) -> None:
    with pytest.raises(OutputPathError, match="no output roots"):
        check_output_dir(str(root), [])


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/", "/ is a system folder: use a folder below it"),
        ("/etc", "inside /etc, a system folder"),
        ("/etc/systemd/system", "inside /etc, a system folder"),
        ("/usr", "inside /usr, a system folder"),
        ("/bin", "inside /bin, a system folder"),
        ("/sbin/x", "inside /sbin, a system folder"),
        ("/lib", "inside /lib, a system folder"),
        ("/lib64/x", "inside /lib64, a system folder"),
        ("/libx32", "inside /libx32, a system folder"),
        ("/boot/grub", "inside /boot, a system folder"),
        ("/dev/shm/x", "inside /dev, a system folder"),
        ("/proc/1/root", "inside /proc, a system folder"),
        ("/sys/kernel", "inside /sys, a system folder"),
        ("/run/vmcraft", "inside /run, a system folder"),
        ("/var", "inside /var, a system folder"),
        ("/var/lib/dpkg", "inside /var, a system folder"),
        ("/var/tmp", "/var/tmp is a system folder: use a folder below it"),
        ("/root", "/root is a system folder: use a folder below it"),
        ("/home", "/home is a system folder: use a folder below it"),
        ("/tmp", "/tmp is a system folder: use a folder below it"),
        ("/var/tmp/out", None),
        ("/var/lib/vmcraft", None),
        ("/var/lib/vmcraft/wave-1", None),
        ("/var/lib/libvirt/images", None),
        ("/root/migrations", None),
        ("/home/ops/out", None),
        ("/srv/vmcraft", None),
        ("/library", "inside /library, a system folder"),
    ],
)
def test_system_folders(path: str, reason: str | None) -> None:
    assert system_folder_reason(path) == reason


def test_a_system_folder_is_refused_even_when_a_root_allows_it() -> None:
    with pytest.raises(OutputPathError, match="inside /etc, a system folder"):
        check_output_dir("/etc/vmcraft", ["/"])


def test_output_roots_for_prefers_the_hosts_own() -> None:
    assert output_roots_for(("/srv/out",), "/home/ops") == ("/srv/out",)
    assert output_roots_for((), "/home/ops") == ("/home/ops",)
    with pytest.raises(OutputPathError, match="no output root"):
        output_roots_for((), None)


# --- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vm_id",
    [
        "summary",
        "SUMMARY",
        ".web01",
        "web01-disk0.qcow2.vmcraft",
        "a.vmcraft",
        "web01-disk0.qcow2",
        "web01-disk12.raw",
        "x.json",
        "x.xml",
        "x.md",
        "x.part-abc",
        "x.tmp",
    ],
)
def test_reserved_ids(vm_id: str) -> None:
    assert vm_id_problem(vm_id) is not None
    with pytest.raises(OutputNameError, match="VM id"):
        check_vm_id(vm_id)


@pytest.mark.parametrize("vm_id", ["web01", "summary2", "a-disk0", "db.prod", "x_1"])
def test_ordinary_ids(vm_id: str) -> None:
    assert vm_id_problem(vm_id) is None
    assert check_vm_id(vm_id) == vm_id


@pytest.mark.parametrize("vm_id", ["", "a/b", None, 3])
def test_ids_that_are_not_names(vm_id: object) -> None:
    with pytest.raises(OutputNameError, match="invalid VM id"):
        check_vm_id(vm_id)


# --- modes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "output"),
    [(0o600, 0o600), (0o644, 0o640), (0o666, 0o640), (0o400, 0o600), (0o755, 0o640)],
)
def test_output_mode_never_wider_than_the_source_nor_0640(source: int, output: int) -> None:
    assert output_mode(stat.S_IFREG | source) == output


# --- opening folders ------------------------------------------------------------------


def test_missing_folders_are_created_0750_whatever_the_umask(root: Path) -> None:
    old = os.umask(0o077)
    try:
        with OutputDir.open(f"{root}/a/b", [str(root)]):
            pass
    finally:
        os.umask(old)
    assert (root / "a").stat().st_mode & 0o777 == 0o750
    assert (root / "a" / "b").stat().st_mode & 0o777 == 0o750


def test_existing_folders_keep_their_mode(root: Path) -> None:
    (root / "mine").mkdir(mode=0o755)
    with OutputDir.open(f"{root}/mine", [str(root)]):
        pass
    assert (root / "mine").stat().st_mode & 0o777 == 0o755


def test_create_false_reports_a_missing_folder(root: Path) -> None:
    with pytest.raises(MissingFolderError, match="no such folder"):
        OutputDir.open(f"{root}/nothing", [str(root)], create=False)
    assert not (root / "nothing").exists()


def test_a_missing_root_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="cannot be opened"):
        OutputDir.open(f"{tmp_path}/unmounted/x", [f"{tmp_path}/unmounted"])
    assert not (tmp_path / "unmounted").exists()


def test_a_symlink_swapped_in_after_the_check_is_not_followed(
    root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fd walk holds even when the path check was raced (here: skipped)."""
    (root / "out").symlink_to(outside)
    monkeypatch.setattr(outfiles, "_check_components", lambda *_args: None)
    monkeypatch.setattr(os.path, "realpath", lambda p: p)
    with pytest.raises(OutputPathError, match="a symlink or not a folder"):
        OutputDir.open(f"{root}/out", [str(root)])
    assert os.listdir(outside) == ["shadow"]


# --- writing files --------------------------------------------------------------------


def test_write_text_publishes_0640_and_records_the_file(out: OutputDir, root: Path) -> None:
    path = out.write_text("web01.json", "{}\n")
    assert path == f"{root}/wave-1/web01.json"
    folder = root / "wave-1"
    assert (folder / "web01.json").read_text() == "{}\n"
    assert (folder / "web01.json").stat().st_mode & 0o777 == 0o640
    assert visible(folder) == ["web01.json"]
    assert sorted(os.listdir(folder)) == [LEDGER_NAME, LOCK_NAME, "web01.json"]
    (entry,) = ledger(folder)["web01.json"]
    assert entry["kind"] == "report" and entry["ino"] == (folder / "web01.json").stat().st_ino
    assert out.is_own("web01.json")


def test_own_files_are_replaced(out: OutputDir, root: Path) -> None:
    out.write_text("web01.json", "one")
    out.write_text("web01.json", "two")
    assert (root / "wave-1" / "web01.json").read_text() == "two"
    # The replaced file's identity is pruned at the next write of the ledger.
    out.write_text("other.json", "x")
    assert len(ledger(root / "wave-1")["web01.json"]) == 1


def test_a_planted_file_is_never_replaced(out: OutputDir, root: Path) -> None:
    planted = root / "wave-1" / "web01-disk0.qcow2"
    planted.write_bytes(b"the operator's own disk")
    with pytest.raises(ForeignFileError) as info:
        out.write_text("web01-disk0.qcow2", "ours")
    assert str(info.value) == (
        f"{planted} exists and was not made by vmcraft-tasks (not in the folder's ledger); "
        "it is not replaced: move it away or choose another output_dir"
    )
    assert info.value.path == str(planted)
    assert planted.read_bytes() == b"the operator's own disk"


def test_a_symlink_at_the_name_is_not_written_through(
    out: OutputDir, root: Path, outside: Path
) -> None:
    (root / "wave-1" / "web01.xml").symlink_to(outside / "shadow")
    with pytest.raises(ForeignFileError, match="a symlink"):
        out.write_text("web01.xml", "<domain/>")
    assert (outside / "shadow").read_text() == "root:secret\n"


def test_old_predictable_temp_names_are_never_used(
    out: OutputDir, root: Path, outside: Path
) -> None:
    (root / "wave-1" / f"web01.xml.tmp-{os.getpid()}").symlink_to(outside / "shadow")
    out.write_text("web01.xml", "<domain/>")
    assert (outside / "shadow").read_text() == "root:secret\n"
    assert (root / "wave-1" / "web01.xml").read_text() == "<domain/>"


def test_a_symlink_planted_at_the_temporary_name_is_refused_not_followed(
    out: OutputDir, root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a guessed temporary name only costs a retry: O_EXCL|O_NOFOLLOW."""
    tokens = iter(["guessed", "fresh", "fresh2", "fresh3"])
    monkeypatch.setattr(secrets, "token_hex", lambda _n: next(tokens))
    (root / "wave-1" / ".web01.json.guessed.tmp").symlink_to(outside / "shadow")
    out.write_text("web01.json", "{}")
    assert (outside / "shadow").read_text() == "root:secret\n"
    assert (root / "wave-1" / "web01.json").read_text() == "{}"


def test_a_file_that_appears_during_the_write_is_not_replaced(
    out: OutputDir, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    target = root / "wave-1" / "web01.json"

    def racing_fsync(fd: int) -> None:
        real_fsync(fd)
        if not target.exists() and stat.S_ISREG(os.fstat(fd).st_mode):
            target.write_text("raced in")

    monkeypatch.setattr(os, "fsync", racing_fsync)
    with pytest.raises(ForeignFileError, match="appeared while the tool was writing"):
        out.write_text("web01.json", "ours")
    assert target.read_text() == "raced in"
    assert not [p for p in os.listdir(root / "wave-1") if p.endswith(".tmp")]


def test_an_own_report_changed_in_place_is_no_longer_own(out: OutputDir, root: Path) -> None:
    out.write_text("web01.json", "{}")
    with open(root / "wave-1" / "web01.json", "a") as fh:
        fh.write("tampered")
    assert not out.is_own("web01.json")
    with pytest.raises(ForeignFileError):
        out.write_text("web01.json", "{}")


def test_a_replaced_file_is_foreign_even_with_the_same_name(out: OutputDir, root: Path) -> None:
    out.write_text("web01.json", "{}")
    os.unlink(root / "wave-1" / "web01.json")
    (root / "wave-1" / "web01.json").write_text("{}")  # new inode, not ours
    with pytest.raises(ForeignFileError):
        out.write_text("web01.json", "{}")


def test_a_fifo_in_the_way_never_hangs(out: OutputDir, root: Path) -> None:
    os.mkfifo(root / "wave-1" / "web01.json")
    with pytest.raises(ForeignFileError, match="not a regular file"):
        out.read_own("web01.json")
    with pytest.raises(ForeignFileError, match="not a regular file"):
        out.write_text("web01.json", "{}")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_file_names_are_one_component(out: OutputDir, name: str) -> None:
    with pytest.raises(OutputNameError):
        out.write_text(name, "x")


# --- the ledger and its lock ------------------------------------------------------------


def test_a_ledger_someone_else_owns_is_not_trusted(out: OutputDir, root: Path) -> None:
    folder = root / "wave-1"
    (folder / "web01-disk0.qcow2").write_bytes(b"planted")
    forged = {"files": {"web01-disk0.qcow2": [{"kind": "disk", "dev": 0, "ino": 0}]}}
    (folder / LEDGER_NAME).write_text(json.dumps(forged))
    os.chown(folder / LEDGER_NAME, 12345, 12345)
    with pytest.raises(ForeignFileError, match=r"\.vmcraft-outputs\.json .*owned by uid 12345"):
        out.write_text("web01.json", "{}")


def test_a_ledger_anyone_may_write_is_not_trusted(out: OutputDir, root: Path) -> None:
    out.write_text("web01.json", "{}")
    (root / "wave-1" / LEDGER_NAME).chmod(0o666)
    with pytest.raises(ForeignFileError, match="writable by others"):
        out.is_own("web01.json")


def test_a_symlinked_ledger_or_lock_is_refused(out: OutputDir, root: Path, outside: Path) -> None:
    (root / "wave-1" / LOCK_NAME).symlink_to(outside / "shadow")
    with pytest.raises(ForeignFileError, match="a symlink"):
        out.write_text("web01.json", "{}")
    os.unlink(root / "wave-1" / LOCK_NAME)
    (root / "wave-1" / LEDGER_NAME).symlink_to(outside / "shadow")
    with pytest.raises(ForeignFileError, match="a symlink"):
        out.write_text("web01.json", "{}")
    assert (outside / "shadow").read_text() == "root:secret\n"


def test_an_unreadable_ledger_says_so(out: OutputDir, root: Path) -> None:
    (root / "wave-1" / LEDGER_NAME).write_text("{not json")
    (root / "wave-1" / LEDGER_NAME).chmod(0o640)
    with pytest.raises(outfiles.OutputError, match="unreadable ledger"):
        out.write_text("web01.json", "{}")


def test_a_deleted_ledger_fails_safe(out: OutputDir, root: Path) -> None:
    out.write_text("web01.json", "{}")
    os.unlink(root / "wave-1" / LEDGER_NAME)
    with pytest.raises(ForeignFileError):
        out.write_text("web01.json", "{}")


def test_threads_writing_one_folder_lose_no_ledger_entry(root: Path) -> None:
    def write(n: int) -> None:
        with OutputDir.open(f"{root}/wave-1", [str(root)]) as mine:
            for k in range(5):
                mine.write_text(f"vm{n}-{k}.json", str(k))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger(root / "wave-1")) == 30


def _write_in_child(folder: str, root: str, n: int) -> None:
    with OutputDir.open(folder, [root]) as mine:
        for k in range(5):
            mine.write_text(f"p{n}-{k}.json", str(k))


def test_processes_writing_one_folder_lose_no_ledger_entry(root: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_write_in_child, args=(f"{root}/wave-1", str(root), n)) for n in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(ledger(root / "wave-1")) == 20


# --- publishing a file another writer made --------------------------------------------


def test_publish_sets_the_mode_and_records_a_disk(out: OutputDir, root: Path) -> None:
    folder = root / "wave-1"
    staged = out.staging_name("web01-disk0.qcow2")
    assert staged.startswith(".web01-disk0.qcow2.") and staged.endswith(".tmp")
    (folder / staged).write_bytes(b"disk")
    ident = out.publish(staged, "web01-disk0.qcow2", mode=0o600)
    assert (folder / "web01-disk0.qcow2").stat().st_mode & 0o777 == 0o600
    assert ident.ino == (folder / "web01-disk0.qcow2").stat().st_ino
    assert not (folder / staged).exists()
    # A disk is changed in place by the fix step and stays the tool's own.
    with open(folder / "web01-disk0.qcow2", "ab") as fh:
        fh.write(b"fixed")
    assert out.is_own("web01-disk0.qcow2")


def test_publish_refuses_a_planted_destination(out: OutputDir, root: Path) -> None:
    folder = root / "wave-1"
    (folder / "web01-disk0.qcow2").write_bytes(b"planted")
    staged = out.staging_name("web01-disk0.qcow2")
    (folder / staged).write_bytes(b"disk")
    with pytest.raises(ForeignFileError, match=r"web01-disk0\.qcow2 exists"):
        out.publish(staged, "web01-disk0.qcow2", mode=0o600)
    assert (folder / "web01-disk0.qcow2").read_bytes() == b"planted"


def test_publish_refuses_a_staged_file_with_a_second_name(out: OutputDir, root: Path) -> None:
    folder = root / "wave-1"
    staged = out.staging_name("web01-disk0.qcow2")
    (folder / staged).write_bytes(b"disk")
    os.link(folder / staged, folder / "elsewhere")
    with pytest.raises(outfiles.OutputError, match="not a plain file of this tool"):
        out.publish(staged, "web01-disk0.qcow2", mode=0o600)


def test_remove_own_leaves_foreign_files(out: OutputDir, root: Path) -> None:
    out.write_text("web01.json", "{}")
    assert out.remove_own("web01.json")
    assert not out.remove_own("web01.json")
    (root / "wave-1" / "db01.json").write_text("planted")
    with pytest.raises(ForeignFileError):
        out.remove_own("db01.json")
    assert (root / "wave-1" / "db01.json").exists()
