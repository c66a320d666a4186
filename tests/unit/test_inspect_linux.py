"""Linux inspection of fake guest trees (plain directories, no mounts)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmcraft_tasks.craft.errors import InspectError
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect import inspect_root, looks_like_os_root
from vmcraft_tasks.craft.inspect.linux import (
    default_package_management,
    inspect_linux,
    parse_hostname_file,
    parse_sysconfig_network,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

ROOT_UUID = "7a1e0c2d-1111-4222-8333-944455556666"
EFI_UUID = "C0DE-F00D"
BOOT_UUID = "b00tb00t-0000-4000-8000-000000000001"


def elf(machine: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHI", 2, machine, 1) + b"\0" * 40


def write(root: Path, path: str, content: str | bytes) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)


def gpt(number: int, uuid: str) -> Partition:
    return Partition(number, 2048 * number, 2048, 512, "linux", "gpt", uuid=uuid)


@pytest.fixture
def debian(tmp_path: Path) -> Path:
    root = tmp_path / "debian"
    write(
        root,
        "/etc/os-release",
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
        'VERSION_ID="12"\nID=debian\n',
    )
    write(root, "/etc/debian_version", "12.5\n")
    write(root, "/etc/hostname", "# set by cloud-init\ndeb-web01\n")
    write(
        root,
        "/etc/fstab",
        f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"
        f"UUID={EFI_UUID.lower()} /boot/efi vfat umask=0077 0 1\n"
        "/dev/sda3 none swap sw 0 0\n"
        "proc /proc proc defaults 0 0\n",
    )
    write(root, "/var/lib/dpkg/status", "Package: base-files\nStatus: install ok installed\n")
    write(root, "/usr/bin/apt-get", elf(62))
    write(root, "/usr/bin/ls", elf(62))
    (root / "bin").symlink_to("usr/bin")
    return root


DEBIAN_FS = [
    Filesystem(1, "vfat", uuid=EFI_UUID),
    Filesystem(2, "ext4", uuid=ROOT_UUID),
    Filesystem(3, "swap", uuid="5a5a5a5a-0000-4000-8000-000000000003"),
]
DEBIAN_PARTS = [gpt(1, "aaaa-1"), gpt(2, "aaaa-2"), gpt(3, "aaaa-3")]


@pytest.fixture
def rocky(tmp_path: Path) -> Path:
    root = tmp_path / "rocky"
    write(
        root,
        "/etc/os-release",
        'NAME="Rocky Linux"\nID="rocky"\nVERSION_ID="9.3"\n'
        'PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n',
    )
    write(root, "/etc/redhat-release", "Rocky Linux release 9.3 (Blue Onyx)\n")
    write(root, "/etc/sysconfig/network", "NETWORKING=yes\nHOSTNAME=rocky-db01.example.com\n")
    write(
        root,
        "/etc/fstab",
        "/dev/mapper/rl-root / xfs defaults 0 0\n"
        f"UUID={BOOT_UUID} /boot xfs defaults 0 0\n"
        "/dev/mapper/rl-swap none swap defaults 0 0\n"
        "tmpfs /dev/shm tmpfs defaults 0 0\n",
    )
    (root / "var" / "lib" / "rpm").mkdir(parents=True)
    write(root, "/usr/bin/dnf-3", "#!/usr/bin/python3\n")
    (root / "usr" / "bin" / "dnf").symlink_to("dnf-3")
    (root / "usr" / "bin" / "yum").symlink_to("dnf-3")
    write(root, "/usr/bin/bash", elf(183))
    (root / "bin").symlink_to("usr/bin")
    return root


ROCKY_FS = [Filesystem(1, "xfs", uuid=BOOT_UUID), Filesystem(2, "LVM2_member", uuid="pv-uuid")]
ROCKY_PARTS = [gpt(1, "bbbb-1"), gpt(2, "bbbb-2")]


def test_inspect_debian(debian: Path) -> None:
    info = inspect_root(
        str(debian), root_partition=2, filesystems=DEBIAN_FS, partitions=DEBIAN_PARTS
    )
    assert info is not None
    assert info.type == "linux"
    assert (info.distro, info.product_name) == ("debian", "Debian GNU/Linux 12 (bookworm)")
    assert (info.major, info.minor) == (12, 5)
    assert info.arch == "x86_64"
    assert info.hostname == "deb-web01"
    assert (info.package_format, info.package_management) == ("deb", "apt")
    mounts = {e.entry.mountpoint: e.resolved_partition for e in info.fstab}
    assert mounts == {"/": 2, "/boot/efi": 1, "none": 3, "/proc": None}
    assert info.notes == ()
    data = info.to_dict()
    assert data["root_partition"] == 2
    assert data["fstab"][0]["how"] == "uuid"
    assert data["notes"] == []


def test_inspect_rocky(rocky: Path) -> None:
    info = inspect_root(str(rocky), root_partition=2, filesystems=ROCKY_FS, partitions=ROCKY_PARTS)
    assert info is not None
    assert (info.type, info.distro, info.major, info.minor) == ("linux", "rocky", 9, 3)
    assert info.product_name == "Rocky Linux 9.3 (Blue Onyx)"
    assert info.arch == "aarch64"
    assert info.hostname == "rocky-db01.example.com"
    assert (info.package_format, info.package_management) == ("rpm", "dnf")
    by_mount = {e.entry.mountpoint: e for e in info.fstab}
    assert by_mount["/boot"].resolved_partition == 1
    assert by_mount["/"].resolved_partition is None
    assert by_mount["/"].how == "device-mapper"
    assert by_mount["/dev/shm"].kind == "virtual"


def test_centos7_minor_comes_from_redhat_release(tmp_path: Path) -> None:
    root = tmp_path / "centos"
    write(root, "/etc/os-release", 'ID="centos"\nVERSION_ID="7"\nPRETTY_NAME="CentOS Linux 7"\n')
    write(root, "/etc/redhat-release", "CentOS Linux release 7.9.2009 (Core)\n")
    write(root, "/usr/lib/sysimage/rpm/rpmdb.sqlite", b"")
    write(root, "/etc/HOSTNAME", "c7.local\n")
    info = inspect_linux(GuestFS(str(root)), root_partition=1, filesystems=[], partitions=[])
    assert (info.distro, info.major, info.minor) == ("centos", 7, 9)
    assert info.package_format == "rpm"
    # No yum/dnf binary in this tree: the distro default decides.
    assert info.package_management == "yum"
    assert info.hostname == "c7.local"
    assert "no /etc/fstab" in info.notes
    assert "no readable ELF binary to tell the architecture" in info.notes


def test_legacy_tree_without_os_release(tmp_path: Path) -> None:
    root = tmp_path / "old"
    write(root, "/etc/fstab", "/dev/hda1 / ext3 defaults 1 1\n")
    write(
        root,
        "/etc/SuSE-release",
        "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4\n",
    )
    (root / "bin").mkdir()
    assert looks_like_os_root(str(root))
    parts = [Partition(1, 63, 1000, 512, "83", "dos")]
    info = inspect_root(str(root), root_partition=1, filesystems=[], partitions=parts)
    assert info is not None
    assert (info.distro, info.major, info.minor) == ("sles", 11, 4)
    assert info.package_management == "zypper"
    assert info.fstab[0].resolved_partition == 1


def test_unknown_distro_is_noted(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    write(root, "/etc/fstab", "# nothing\n")
    (root / "usr").mkdir()
    info = inspect_root(str(root), root_partition=1, filesystems=[], partitions=[])
    assert info is not None
    assert info.distro is None and info.package_management is None
    assert "no os-release or distribution release file found" in info.notes


def test_escaping_os_release_symlink_reads_the_guest(tmp_path: Path) -> None:
    # /etc/os-release -> ../usr/lib/os-release is normal; an absolute link must stay inside.
    root = tmp_path / "linked"
    write(root, "/usr/lib/os-release", 'ID=fedora\nVERSION_ID=39\nNAME="Fedora Linux"\n')
    (root / "etc").mkdir()
    (root / "etc" / "os-release").symlink_to("/usr/lib/os-release")
    info = inspect_root(str(root), root_partition=3, filesystems=[], partitions=[])
    assert info is not None
    assert (info.distro, info.major, info.package_management) == ("fedora", 39, "dnf")


def test_not_an_os_root(tmp_path: Path) -> None:
    data = tmp_path / "home"
    write(data, "/alice/notes.txt", "hi")
    write(data, "/etc/only-etc", "a /home partition with an etc dir is not a root")
    assert not looks_like_os_root(str(data))
    assert inspect_root(str(data), root_partition=4, filesystems=[], partitions=[]) is None
    assert not looks_like_os_root(str(tmp_path / "missing"))


def test_bad_root_is_an_inspect_error(tmp_path: Path) -> None:
    with pytest.raises(InspectError, match="cannot inspect"):
        inspect_root(str(tmp_path / "missing"), root_partition=1, filesystems=[], partitions=[])


def test_pure_helpers() -> None:
    assert parse_hostname_file("\n# c\n  host1  extra\n") == "host1"
    assert parse_hostname_file("# only comments\n") is None
    assert parse_sysconfig_network('NETWORKING=yes\nHOSTNAME="rh6.example"\n') == "rh6.example"
    assert parse_sysconfig_network("NETWORKING=yes\n") is None
    assert default_package_management("rhel", 7) == "yum"
    assert default_package_management("almalinux", 9) == "dnf"
    assert default_package_management("ubuntu", 22) == "apt"
    assert default_package_management("nixos", 23) is None
