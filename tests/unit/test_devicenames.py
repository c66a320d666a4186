"""Hypervisor-bound device names a guest still depends on (pure parsers + the reader)."""

from __future__ import annotations

import re

from vmcraft_tasks.craft.fixes.devicenames import (
    DeviceNameUse,
    device_name_uses,
    in_crypttab,
    in_fstab,
    in_kernel_args,
)
from vmcraft_tasks.craft.guestpath import GuestFS

FSTAB = """\
# /etc/fstab
UUID=1111-2222 / ext4 errors=remount-ro 0 1
/dev/sda2 /boot ext4 defaults 0 2
/dev/sdb1 /data xfs defaults,nofail 0 2
/dev/xvdc1 /srv ext4 defaults 0 2
/dev/sda4 none swap sw 0 0
/dev/vda5 /opt ext4 defaults 0 2
/dev/disk/by-id/scsi-36000c29-part1 /backup ext4 noauto 0 0
proc /proc proc defaults 0 0
"""


def test_fstab_lists_boot_critical_hardware_names_only():
    assert in_fstab(FSTAB) == [
        DeviceNameUse("/dev/sda2", "/etc/fstab", "fstab /boot"),
        DeviceNameUse("/dev/xvdc1", "/etc/fstab", "fstab /srv"),
        DeviceNameUse("/dev/sda4", "/etc/fstab", "fstab swap"),
    ]


def test_only_sd_names_survive_on_a_sata_disk():
    uses = {u.name: u.sd_bus_keeps_it for u in in_fstab(FSTAB)}
    assert uses == {"/dev/sda2": True, "/dev/xvdc1": False, "/dev/sda4": True}


GRUB_CFG = """\
menuentry 'Debian GNU/Linux' {
	search --no-floppy --fs-uuid --set=root 0f0e
	set root='hd0,gpt2'
	linux	/vmlinuz-6.1.0-28-amd64 root=/dev/sda3 ro console=ttyS0 resume=/dev/sda4 quiet
	initrd	/initrd.img-6.1.0-28-amd64
}
menuentry 'rescue' {
	linux	/vmlinuz-6.1.0-28-amd64 root=UUID=abcd ro single
}
"""


def test_kernel_lines_of_grub_cfg():
    pattern = re.compile(r"^\s*linux\s")
    assert in_kernel_args(GRUB_CFG, "/boot/grub/grub.cfg", pattern) == [
        DeviceNameUse("/dev/sda3", "/boot/grub/grub.cfg", "kernel root="),
        DeviceNameUse("/dev/sda4", "/boot/grub/grub.cfg", "kernel resume="),
    ]


def test_crypttab_device_fields():
    text = (
        "# name dev key opts\ncryptdata /dev/sdb2 none luks\ncryptswap /dev/sdc1 none luks,nofail\n"
    )
    assert in_crypttab(text) == [DeviceNameUse("/dev/sdb2", "/etc/crypttab", "crypttab cryptdata")]


def test_reader_walks_fstab_crypttab_grub_and_bls(tmp_path):
    files = {
        "etc/fstab": FSTAB,
        "etc/crypttab": "c /dev/hda3 none luks\n",
        "boot/grub/grub.cfg": GRUB_CFG,
        "etc/default/grub": 'GRUB_CMDLINE_LINUX_DEFAULT="quiet root=/dev/sda3"\n',
        "boot/loader/entries/a.conf": "title x\noptions root=/dev/nvme0n1p2 ro\n",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    uses = [str(u) for u in device_name_uses(GuestFS(str(tmp_path)))]
    assert uses == [
        "/etc/fstab: fstab /boot names /dev/sda2",
        "/etc/fstab: fstab /srv names /dev/xvdc1",
        "/etc/fstab: fstab swap names /dev/sda4",
        "/etc/crypttab: crypttab c names /dev/hda3",
        "/boot/grub/grub.cfg: kernel root= names /dev/sda3",
        "/boot/grub/grub.cfg: kernel resume= names /dev/sda4",
        "/etc/default/grub: kernel root= names /dev/sda3",
        "/boot/loader/entries/a.conf: kernel root= names /dev/nvme0n1p2",
    ]


def test_a_guest_symlink_to_a_host_file_is_not_followed_out(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "fstab").symlink_to("/etc/fstab")
    # Re-rooted inside the guest: there is no /etc/fstab behind the link, nothing read.
    assert device_name_uses(GuestFS(str(tmp_path))) == []
