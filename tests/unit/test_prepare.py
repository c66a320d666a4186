"""The verdict on a guest: what makes `prepare_guest` refuse to call it ready.

Guests here are directory trees (no kernel, no generator), enough to reach every
reason a VM must fail; real guests are in tests/integration/test_prepare_guest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.prepare import prepare_guest
from vmcraft_tasks.craft.probe import Filesystem

DEBIAN = OSInfo(root_partition=1, type="linux", distro="debian", major=12, arch="x86_64")
FILESYSTEMS = [Filesystem(partition=1, type="ext4", uuid="0a0b0c0d-1111-2222-3333-444455556666")]


def _tree(root: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_a_guest_without_a_kernel_is_not_ready(tmp_path):
    root = _tree(
        tmp_path, {"etc/fstab": "UUID=0a0b0c0d-1111-2222-3333-444455556666 / ext4 defaults 0 1\n"}
    )
    prep = prepare_guest(root, DEBIAN, FILESYSTEMS, [], mode="apply")
    assert prep.problem is not None and "no bootable kernel found" in prep.problem
    assert prep.guestcaps.block_bus == "sata"


def test_a_fix_that_could_not_be_written_fails_the_guest(tmp_path, monkeypatch):
    root = _tree(tmp_path, {"etc/fstab": "/dev/sda1 / ext4 defaults 0 1\n"})

    def refuse(self, path, data, *, mode=None):  # FAKE: a write the guest filesystem refuses
        raise GuestPathError(path, "read-only file system")

    monkeypatch.setattr(GuestFS, "write_file", refuse)
    prep = prepare_guest(root, DEBIAN, FILESYSTEMS, [], mode="apply")
    assert prep.problem is not None
    assert "fix fstab could not be applied to /etc/fstab: read-only file system" in prep.problem
    # Not written, so the guest still names /dev/sda1: only SATA would find it.
    assert [str(use) for use in prep.device_names] == ["/etc/fstab: fstab / names /dev/sda1"]


def test_a_device_name_no_bus_provides_fails_the_guest(tmp_path):
    root = _tree(tmp_path, {"etc/fstab": "/dev/xvdb1 /srv ext4 defaults 0 2\n"})
    prep = prepare_guest(root, DEBIAN, FILESYSTEMS, [], mode="off")
    assert prep.problem is not None
    assert "no KVM disk bus provides: /etc/fstab: fstab /srv names /dev/xvdb1" in prep.problem


def test_a_dry_run_is_reported_not_failed(tmp_path):
    root = _tree(tmp_path, {"etc/fstab": "/dev/sda1 / ext4 defaults 0 1\n"})
    prep = prepare_guest(root, DEBIAN, FILESYSTEMS, [], mode="dry_run")
    assert prep.problem is None
    assert any(note.startswith("a real run would fail: ") for note in prep.notes)
    assert (tmp_path / "etc/fstab").read_text() == "/dev/sda1 / ext4 defaults 0 1\n"


@pytest.mark.parametrize("os_type", ["unknown"])
def test_an_unrecognised_os_is_not_ready(tmp_path, os_type):
    info = OSInfo(root_partition=2, type=os_type, notes=("Windows directory found but no cmd.exe",))
    prep = prepare_guest(str(tmp_path), info, FILESYSTEMS, [], mode="apply")
    assert prep.problem == (
        "the operating system on partition 2 was not recognised: "
        "Windows directory found but no cmd.exe"
    )
