"""The offline fixes on a VM of several disks and LVM: names of every disk become UUIDs.

With the VM's `VolumeTable`, filesystems and partitions are numbered VM-wide (disk k's
partition p is k*1000+p, LVs from 100000): /dev/sdb2 is disk 2 partition 2, LVM names
are kept, and a disk the VM does not have is never guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmcraft_tasks.craft.fixes.bootloader import DeviceMap, rewrite_crypttab, rewrite_kernel_args
from vmcraft_tasks.craft.fixes.devicenames import device_name_uses
from vmcraft_tasks.craft.fixes.distros import apply_fixes
from vmcraft_tasks.craft.fixes.fstab import guest_disk_index, rewrite_fstab, volume_label
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import LVName, VolumeTable

BOOT = "5d1a2b3c-aaaa-bbbb-cccc-000000000002"
ROOT = "0b3c6a5e-8f1d-4a4e-9a53-3d2b1f0e9c11"
VAR = "a1a1a1a1-0000-4000-8000-000000001001"
SRV = "b2b2b2b2-0000-4000-8000-000000001002"
DATA = "c3c3c3c3-0000-4000-8000-000000002000"
SWAP = "d4d4d4d4-0000-4000-8000-000000001003"
LUKS = "e5e5e5e5-0000-4000-8000-000000001004"
LV_HOME = "f6f6f6f6-0000-4000-8000-000000100000"
LV_VAR = "07070707-0000-4000-8000-000000100001"


def _parts(*numbers: int) -> list[Partition]:
    return [Partition(n, 2048 * n, 2048, 512, "8300", "gpt") for n in numbers]


# Disk 1: BIOS boot, /boot, /. Disk 2: /var (xfs), /srv, swap, LUKS. Disk 3: one
# filesystem on the whole disk. VG rl on top: home and var.
DISKS = [_parts(1, 2, 3), _parts(1, 2, 3, 4), []]
TABLE = VolumeTable.build(
    DISKS, [LVName("rl", "home", "vg-uuid-1"), LVName("rl", "var", "vg-uuid-1")]
)
PARTITIONS = TABLE.vm_partitions(DISKS)
FILESYSTEMS = [
    Filesystem(1, None, content="BIOS boot partition"),
    Filesystem(2, "ext4", uuid=BOOT),
    Filesystem(3, "ext4", uuid=ROOT),
    Filesystem(1001, "xfs", uuid=VAR),
    Filesystem(1002, "ext4", uuid=SRV),
    Filesystem(1003, "swap", uuid=SWAP),
    Filesystem(1004, "crypto_LUKS", uuid=LUKS),
    Filesystem(2000, "ext4", uuid=DATA),
    Filesystem(100000, "ext4", uuid=LV_HOME),
    Filesystem(100001, "xfs", uuid=LV_VAR),
]


def _rewrite(
    text: str, root_partition: int | None = 3, volumes: VolumeTable | None = TABLE
) -> tuple[str, list[str], list[str]]:
    new, changes, left = rewrite_fstab(
        text, FILESYSTEMS, PARTITIONS, root_partition=root_partition, volumes=volumes
    )
    return new, [c.reason for c in changes], [u.reason for u in left]


def test_the_volume_table_numbers_the_fixture_as_documented() -> None:
    assert TABLE.disks() == 3
    assert [TABLE.on_disk(1, 2), TABLE.on_disk(2, 0)] == [TABLE.get(1002), TABLE.get(2000)]
    assert [v.number for v in TABLE.lvs_named("rl", "home")] == [100000]
    assert volume_label(1002, TABLE) == "disk 2 partition 2"
    assert volume_label(1002, None) == "partition 1002"
    assert volume_label(2, TABLE) == "partition 2"


@pytest.mark.parametrize(
    ("spec", "index"),
    [
        ("/dev/sda1", 0),
        ("/dev/sdb", 1),
        ("/dev/vdc3", 2),
        ("/dev/xvdaa1", 26),
        ("/dev/nvme1n1p2", 1),
        ("/dev/nvme0n2", None),  # a second namespace, not a second disk
        ("/dev/mapper/rl-var", None),
        ("/dev/disk/by-id/scsi-X-part1", None),
    ],
)
def test_guest_disk_index(spec: str, index: int | None) -> None:
    assert guest_disk_index(spec) == index


def test_sdx_names_of_every_disk_become_uuids_and_lvm_names_are_kept() -> None:
    text = (
        "/dev/sda3 / ext4 defaults 1 1\n"
        "/dev/sda2 /boot ext4 defaults 1 2\n"
        "/dev/sdb1 /var xfs defaults 0 0\n"
        "/dev/sdb2\t/srv\text4\tdefaults\t1 2   # on disk 2\n"
        "/dev/sdb3 none swap sw 0 0\n"
        "/dev/sdc /data ext4 defaults 0 2\n"
        "/dev/mapper/rl-var /var/lib xfs defaults 0 0\n"
        "/dev/rl/home /home ext4 defaults 1 2\n"
    )
    new, reasons, left = _rewrite(text)
    assert new == (
        f"UUID={ROOT} / ext4 defaults 1 1\n"
        f"UUID={BOOT} /boot ext4 defaults 1 2\n"
        f"UUID={VAR} /var xfs defaults 0 0\n"
        f"UUID={SRV}\t/srv\text4\tdefaults\t1 2   # on disk 2\n"
        f"UUID={SWAP} none swap sw 0 0\n"
        f"UUID={DATA} /data ext4 defaults 0 2\n"
        "/dev/mapper/rl-var /var/lib xfs defaults 0 0\n"
        "/dev/rl/home /home ext4 defaults 1 2\n"
    )
    assert left == []  # the LVM names are stable: kept, and not reported
    assert reasons[3] == "/dev/sdb2 is disk 2 partition 2; its name changes on KVM"
    assert reasons[5] == "/dev/sdc is disk 3 (whole disk); its name changes on KVM"
    # Idempotent: the rewritten fstab has nothing left to do.
    assert _rewrite(new) == (new, [], [])


def test_without_volumes_other_disks_are_left_as_before() -> None:
    text = "/dev/sda3 / ext4 defaults 1 1\n/dev/sdb2 /srv ext4 defaults 1 2\n"
    new, _reasons, left = rewrite_fstab(
        text, FILESYSTEMS[:3], DISKS[0], root_partition=3, volumes=None
    )
    assert new.splitlines()[1] == "/dev/sdb2 /srv ext4 defaults 1 2"
    assert left[0].reason == "/dev/sdb2 is on another disk of the guest (/ is on /dev/sda)"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            "/dev/sdd1 /x ext4 defaults 0 2",
            "/dev/sdd1 names the guest's disk 4, but the VM has 3 disks",
        ),
        (
            "/dev/sde /x ext4 defaults 0 2",
            "/dev/sde names the guest's disk 5, but the VM has 3 disks",
        ),
        ("/dev/sdb7 /x ext4 defaults 0 2", "disk 2 of the VM has no partition 7"),
        ("/dev/sdb /x ext4 defaults 0 2", "/dev/sdb is a whole disk, not a partition"),
        (
            "/dev/sdb4 /x ext4 defaults 0 2",
            "fstab says ext4 but disk 2 partition 4 holds crypto_LUKS",
        ),
        ("/dev/sda1 /x ext4 defaults 0 2", "partition 1 has no filesystem UUID"),
        ("/dev/sdb1 /x ext4 defaults 0 2", "fstab says ext4 but disk 2 partition 1 holds xfs"),
    ],
)
def test_names_that_cannot_be_mapped_stay_with_their_reason(line: str, reason: str) -> None:
    text = f"/dev/sda3 / ext4 defaults 1 1\n{line}\n"
    new, _reasons, left = _rewrite(text)
    assert new.splitlines()[1] == line
    assert left == [reason]


def test_a_vm_of_one_disk_says_so() -> None:
    one = VolumeTable.build([DISKS[0]])
    new, _changes, left = rewrite_fstab(
        "/dev/sdb2 /srv ext4 defaults 0 2\n",
        FILESYSTEMS[:3],
        one.vm_partitions([DISKS[0]]),
        root_partition=3,
        volumes=one,
    )
    assert new == "/dev/sdb2 /srv ext4 defaults 0 2\n"
    assert [u.reason for u in left] == ["/dev/sdb2 names the guest's disk 2, but the VM has 1 disk"]


def test_a_root_on_an_lv_still_maps_the_disks() -> None:
    text = "/dev/mapper/rl-root / ext4 defaults 1 1\n/dev/sdb2 /srv ext4 defaults 1 2\n"
    new, _reasons, left = _rewrite(text, root_partition=100000)
    assert new.splitlines() == [
        "/dev/mapper/rl-root / ext4 defaults 1 1",
        f"UUID={SRV} /srv ext4 defaults 1 2",
    ]
    assert left == []


@pytest.mark.parametrize(
    ("root_line", "root_partition", "found"),
    [
        ("/dev/sda2 / ext4 defaults 1 1", 3, "partition 3"),  # another partition of disk 1
        ("/dev/sdb3 / ext4 defaults 1 1", 3, "partition 3"),  # letters off by one disk
        ("/dev/sda3 / ext4 defaults 1 1", 100000, "LV rl/home"),
    ],
)
def test_a_root_entry_contradicting_inspection_trusts_no_disk_name(
    root_line: str, root_partition: int, found: str
) -> None:
    text = f"{root_line}\n/dev/sdb2 /srv ext4 defaults 1 2\n/dev/sda2 /boot ext4 defaults 1 2\n"
    new, reasons, left = _rewrite(text, root_partition=root_partition)
    assert new == text and reasons == []
    spec = root_line.split(maxsplit=1)[0]
    assert (
        left
        == [
            f"fstab mounts / from {spec} but the root filesystem is {found}: "
            "the guest's disk names cannot be trusted"
        ]
        * 3
    )


def test_by_id_names_of_the_root_disk_are_mapped_on_its_disk() -> None:
    text = (
        "/dev/disk/by-id/scsi-ROOTDISK-part3 / ext4 defaults 1 1\n"
        "/dev/disk/by-id/scsi-ROOTDISK-part2 /boot ext4 defaults 1 2\n"
        "/dev/disk/by-id/scsi-OTHER-part2 /srv ext4 defaults 1 2\n"
        "/dev/sdb2 /srv2 ext4 defaults 1 2\n"
    )
    new, _reasons, left = _rewrite(text)
    assert new.splitlines()[:2] == [
        f"UUID={ROOT} / ext4 defaults 1 1",
        f"UUID={BOOT} /boot ext4 defaults 1 2",
    ]
    assert new.splitlines()[2] == "/dev/disk/by-id/scsi-OTHER-part2 /srv ext4 defaults 1 2"
    assert left == ["by-id/by-path names depend on the guest's hardware"]
    assert new.splitlines()[3] == f"UUID={SRV} /srv2 ext4 defaults 1 2"


def test_a_uuid_cloned_across_disks_is_not_used() -> None:
    cloned = [
        fs if fs.partition != 2000 else Filesystem(2000, "ext4", uuid=SRV) for fs in FILESYSTEMS
    ]
    _new, _changes, left = rewrite_fstab(
        "/dev/sdb2 /srv ext4 defaults 0 2\n",
        cloned,
        PARTITIONS,
        root_partition=3,
        volumes=TABLE,
    )
    assert [u.reason for u in left] == [
        f"UUID {SRV} is shared by disk 2 partition 2, disk 3 (whole disk) (cloned filesystems)"
    ]


# -- the boot path ------------------------------------------------------------------

DEVICES = DeviceMap(FILESYSTEMS, PARTITIONS, root_partition=3, volumes=TABLE)


def test_kernel_arguments_of_other_disks_are_mapped() -> None:
    args = (
        "root=/dev/sda3 ro resume=/dev/sdb3 rd.lvm.lv=rl/home "
        "root=/dev/mapper/rl-root resume=/dev/sdd2"
    )
    new, reasons, left = rewrite_kernel_args(args, DEVICES)
    assert new == (
        f"root=UUID={ROOT} ro resume=UUID={SWAP} rd.lvm.lv=rl/home "
        "root=/dev/mapper/rl-root resume=/dev/sdd2"
    )
    assert (
        reasons[1] == "resume=/dev/sdb3: /dev/sdb3 is disk 2 partition 3; its name changes on KVM"
    )
    assert [(u.line, u.reason) for u in left] == [
        ("resume=/dev/sdd2", "/dev/sdd2 names the guest's disk 4, but the VM has 3 disks")
    ]


def test_a_root_argument_on_another_disk_than_the_root_is_refused() -> None:
    _new, _reasons, left = rewrite_kernel_args("root=/dev/sdb2 ro", DEVICES)
    assert [u.reason for u in left] == [
        "/dev/sdb2 is disk 2 partition 2 but the root filesystem was found on partition 3: "
        "the guest's disk names cannot be trusted"
    ]
    _new, _reasons, left = rewrite_kernel_args("resume=/dev/sdb2", DEVICES)
    assert [u.reason for u in left] == ["disk 2 partition 2 holds ext4, not swap"]


def test_crypttab_on_disk_2() -> None:
    new, changes, left = rewrite_crypttab("data /dev/sdb4 none luks\n", DEVICES)
    assert new == f"data UUID={LUKS} none luks\n" and len(changes) == 1 and left == []


# -- apply_fixes and the names left behind ------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> GuestFS:
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return GuestFS(str(root))


ROCKY = OSInfo(root_partition=3, type="linux", distro="rocky", major=9, arch="x86_64")
GUEST = {
    "/etc/fstab": (
        "/dev/sda3 / ext4 defaults 1 1\n"
        "/dev/sdb2 /srv ext4 defaults 1 2\n"
        "/dev/sdd1 /gone ext4 defaults 0 2\n"
        "/dev/mapper/rl-var /var xfs defaults 0 0\n"
        "/dev/rl/home /home ext4 defaults 1 2\n"
    ),
    "/boot/loader/entries/a.conf": "title x\noptions root=/dev/sda3 ro resume=/dev/sdb3\n",
    "/etc/crypttab": "data /dev/sdb4 none luks\n",
}


def test_apply_fixes_with_volumes_rewrites_every_disk(tmp_path: Path) -> None:
    fs = _tree(tmp_path, GUEST)
    report = apply_fixes(fs, ROCKY, FILESYSTEMS, PARTITIONS, dry_run=False, volumes=TABLE)
    assert (tmp_path / "etc/fstab").read_text() == (
        f"UUID={ROOT} / ext4 defaults 1 1\n"
        f"UUID={SRV} /srv ext4 defaults 1 2\n"
        "/dev/sdd1 /gone ext4 defaults 0 2\n"
        "/dev/mapper/rl-var /var xfs defaults 0 0\n"
        "/dev/rl/home /home ext4 defaults 1 2\n"
    )
    assert (tmp_path / "boot/loader/entries/a.conf").read_text() == (
        f"title x\noptions root=UUID={ROOT} ro resume=UUID={SWAP}\n"
    )
    assert (tmp_path / "etc/crypttab").read_text() == f"data UUID={LUKS} none luks\n"
    assert [(s.name, s.reason) for s in report.skipped if s.name == "fstab"] == [
        (
            "fstab",
            "/dev/sdd1 /gone ext4 defaults 0 2: /dev/sdd1 names the guest's disk 4, "
            "but the VM has 3 disks",
        )
    ]
    json.dumps(report.to_dict())
    # What is left: only the name of the disk the VM does not have, on no bus at all.
    (use,) = device_name_uses(fs, TABLE)
    assert use.name == "/dev/sdd1" and not use.sd_bus_keeps_it
    assert str(use) == "/etc/fstab: fstab /gone names /dev/sdd1 (the VM has 3 disks, not 4)"
    # Without the volumes the same name looks like one a SATA disk would keep.
    (plain,) = device_name_uses(fs)
    assert plain.sd_bus_keeps_it and plain.missing_disk is None


def test_apply_fixes_without_volumes_is_unchanged(tmp_path: Path) -> None:
    fs = _tree(tmp_path, GUEST)
    report = apply_fixes(fs, ROCKY, FILESYSTEMS[:3], DISKS[0], dry_run=True)
    reasons = [s.reason for s in report.skipped if s.name == "fstab"]
    assert reasons == [
        "/dev/sdb2 /srv ext4 defaults 1 2: /dev/sdb2 is on another disk of the guest "
        "(/ is on /dev/sda)",
        "/dev/sdd1 /gone ext4 defaults 0 2: /dev/sdd1 is on another disk of the guest "
        "(/ is on /dev/sda)",
    ]
