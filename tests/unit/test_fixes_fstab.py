"""fstab rewriting: hypervisor-dependent device names become UUID=, nothing else moves."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.fixes.fstab import is_hardware_name, rewrite_fstab, split_partition_name
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

ROOT = "0b3c6a5e-8f1d-4a4e-9a53-3d2b1f0e9c11"
BOOT = "5d1a2b3c-aaaa-bbbb-cccc-000000000002"
SWAP = "11111111-2222-3333-4444-555555555555"

FILESYSTEMS = [
    Filesystem(1, "ext4", uuid=ROOT),
    Filesystem(2, "ext3", uuid=BOOT),
    Filesystem(3, "vfat", uuid="ABCD-1234"),
    Filesystem(5, "swap", uuid=SWAP),
    Filesystem(6, "xfs", uuid=None),
]


def _part(number: int, *, extended: bool = False) -> Partition:
    return Partition(number, 2048 * number, 2048, 512, "83", "dos", extended=extended)


PARTITIONS = [_part(1), _part(2), _part(3), _part(4, extended=True), _part(5), _part(6)]


def _rewrite(text: str, root_partition: int | None = 1) -> tuple[str, list[str], list[str]]:
    new, changes, left = rewrite_fstab(text, FILESYSTEMS, PARTITIONS, root_partition=root_partition)
    return new, [f"{c.before} -> {c.after}" for c in changes], [u.reason for u in left]


def test_sda_entries_become_uuid_keeping_the_rest_byte_exact() -> None:
    text = (
        "# /etc/fstab: static file system information.\n"
        "#\n"
        "/dev/sda1       /       ext4    errors=remount-ro 0       1\n"
        "\n"
        "  /dev/sda2\t/boot\text4\tdefaults\t0\t2   # old boot\n"
        "/dev/sda5 none swap sw 0 0\n"
        "proc /proc proc defaults 0 0\n"
        "/dev/vda3 /srv ext4 defaults 0 0\n"
        f"UUID={ROOT} /also ext4 defaults 0 0\n"
        "/dev/mapper/vg-var /var xfs defaults 0 0\n"
        "/dev/cdrom /media/cdrom udf,iso9660 user,noauto 0 0\n"
    )
    new, changes, left = _rewrite(text)
    assert new == (
        "# /etc/fstab: static file system information.\n"
        "#\n"
        f"UUID={ROOT}       /       ext4    errors=remount-ro 0       1\n"
        "\n"
        f"  UUID={BOOT}\t/boot\text4\tdefaults\t0\t2   # old boot\n"
        f"UUID={SWAP} none swap sw 0 0\n"
        "proc /proc proc defaults 0 0\n"
        "/dev/vda3 /srv ext4 defaults 0 0\n"
        f"UUID={ROOT} /also ext4 defaults 0 0\n"
        "/dev/mapper/vg-var /var xfs defaults 0 0\n"
        "/dev/cdrom /media/cdrom udf,iso9660 user,noauto 0 0\n"
    )
    assert len(changes) == 3
    assert changes[2] == f"/dev/sda5 none swap sw 0 0 -> UUID={SWAP} none swap sw 0 0"
    assert left == []


def test_line_endings_and_missing_final_newline_are_kept() -> None:
    new, _, _ = _rewrite("/dev/sda1 / ext4 defaults 0 1\r\n/dev/sda2 /boot ext4 defaults")
    assert new == f"UUID={ROOT} / ext4 defaults 0 1\r\nUUID={BOOT} /boot ext4 defaults"


@pytest.mark.parametrize("spec", ["/dev/hda2", "/dev/xvda2", "/dev/nvme0n1p2"])
def test_other_hypervisor_names_are_rewritten(spec: str) -> None:
    new, changes, _ = _rewrite(f"{spec} /boot ext4 defaults 0 2\n", root_partition=None)
    assert new == f"UUID={BOOT} /boot ext4 defaults 0 2\n"
    assert len(changes) == 1


def test_rewriting_is_idempotent() -> None:
    once, _, _ = _rewrite("/dev/sda1 / ext4 defaults 0 1\n/dev/sda5 none swap sw 0 0\n")
    twice, changes, left = _rewrite(once)
    assert twice == once
    assert changes == [] and left == []


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("/dev/sdb1 /data ext4 defaults 0 2", "another disk"),
        ("/dev/sda /data ext4 defaults 0 2", "whole disk"),
        ("/dev/sda4 /data ext4 defaults 0 2", "extended"),
        ("/dev/sda9 /data ext4 defaults 0 2", "no partition 9"),
        ("/dev/sda6 /data xfs defaults 0 2", "no filesystem UUID"),
        ("/dev/sda3 /data ext4 defaults 0 2", "fstab says ext4 but partition 3 holds vfat"),
    ],
)
def test_unresolvable_entries_are_left_and_reported(line: str, reason: str) -> None:
    text = f"/dev/sda1 / ext4 defaults 0 1\n{line}\n"
    new, changes, left = _rewrite(text)
    assert new.splitlines()[1] == line
    assert len(changes) == 1  # only the root line
    assert len(left) == 1 and reason in left[0]


def test_compatible_type_spellings_are_accepted() -> None:
    # ext3 on disk mounted as ext4, vfat as msdos, auto and type lists.
    text = (
        "/dev/sda2 /boot ext4 defaults 0 2\n"
        "/dev/sda3 /efi msdos defaults 0 2\n"
        "/dev/sda1 /x auto defaults 0 0\n"
        "/dev/sda3 /y udf,vfat defaults 0 0\n"
    )
    _, changes, left = _rewrite(text, root_partition=None)
    assert len(changes) == 4 and left == []


def test_cloned_uuid_is_refused() -> None:
    clones = [Filesystem(1, "ext4", uuid=ROOT), Filesystem(2, "ext4", uuid=ROOT.upper())]
    new, changes, left = rewrite_fstab("/dev/sda2 /b ext4 defaults 0 0\n", clones, PARTITIONS)
    assert changes == []
    assert "shared by partitions 1, 2" in left[0].reason
    assert new == "/dev/sda2 /b ext4 defaults 0 0\n"


def test_by_id_and_by_path_map_through_the_root_entry() -> None:
    disk = "/dev/disk/by-id/scsi-36000c29f0a1b2c3d4e5f6a7b8c9d0e1f"
    text = (
        f"{disk}-part1 / ext4 defaults 0 1\n"
        f"{disk}-part5 swap swap defaults 0 0\n"
        "/dev/disk/by-id/ata-OTHER_DISK-part1 /other ext4 defaults 0 2\n"
        "/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0-part2 /boot ext4 defaults 0 2\n"
    )
    new, changes, left = _rewrite(text)
    lines = new.splitlines()
    assert lines[0] == f"UUID={ROOT} / ext4 defaults 0 1"
    assert lines[1] == f"UUID={SWAP} swap swap defaults 0 0"
    assert lines[2].startswith("/dev/disk/by-id/ata-OTHER_DISK-part1")
    assert lines[3].startswith("/dev/disk/by-path/")  # a different name for a disk
    assert len(changes) == 2
    assert len(left) == 2 and all("another disk" in reason for reason in left)


def test_by_id_without_a_known_root_is_left() -> None:
    text = "/dev/disk/by-id/scsi-0VMware_Virtual_disk-part1 / ext4 defaults 0 1\n"
    new, changes, left = _rewrite(text, root_partition=None)
    assert new == text and changes == []
    assert "hardware" in left[0]


def test_root_entry_contradicting_the_root_partition_blocks_its_disk() -> None:
    # fstab says / is sda3 but the root filesystem was found on partition 1:
    # the guest's sda is not this disk's numbering, so no sda name can be trusted.
    text = "/dev/sda3 / ext4 defaults 0 1\n/dev/sda2 /boot ext4 defaults 0 2\n"
    new, changes, left = _rewrite(text, root_partition=1)
    assert new == text and changes == []
    assert len(left) == 2 and all("cannot be trusted" in reason for reason in left)


def test_root_on_the_guests_second_disk() -> None:
    # The converted disk was the guest's sdb: sdb names map, sda names are elsewhere.
    text = "/dev/sdb1 / ext4 defaults 0 1\n/dev/sda2 /old ext4 defaults 0 2\n"
    new, changes, left = _rewrite(text, root_partition=1)
    assert new.splitlines() == [
        f"UUID={ROOT} / ext4 defaults 0 1",
        "/dev/sda2 /old ext4 defaults 0 2",
    ]
    assert len(changes) == 1
    assert "another disk" in left[0]


def test_non_device_entries_are_never_touched() -> None:
    text = (
        "/dev/sda2 /mnt/bind none bind 0 0\n"
        "tmpfs /tmp tmpfs defaults 0 0\n"
        "/swapfile none swap sw 0 0\n"
        "nas:/export /mnt/nas nfs defaults 0 0\n"
    )
    new, changes, left = _rewrite(text)
    assert (new, changes, left) == (text, [], [])


def test_hardware_name_classification() -> None:
    for spec in ("/dev/sda1", "/dev/hdc", "/dev/xvdb3", "/dev/nvme0n1p1", "/dev/disk/by-id/x"):
        assert is_hardware_name(spec), spec
    for spec in ("/dev/vda1", "UUID=x", "/dev/mapper/x", "/dev/disk/by-uuid/x", "/dev/sr0"):
        assert not is_hardware_name(spec), spec
    assert split_partition_name("/dev/sdab12") == ("/dev/sdab", 12)
    assert split_partition_name("/dev/nvme1n2p3") == ("/dev/nvme1n2", 3)
    assert split_partition_name("/dev/disk/by-path/pci-0:0-part7") == (
        "/dev/disk/by-path/pci-0:0",
        7,
    )
    assert split_partition_name("/dev/sda") is None
