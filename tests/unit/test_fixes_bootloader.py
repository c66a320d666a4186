"""Boot-path rewrites: kernel command lines, resume and crypttab name devices by UUID."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmcraft_tasks.craft.fixes.bootloader import (
    GRUBENV_SIGNATURE,
    DeviceMap,
    Rewritten,
    rewrite_bls_entry,
    rewrite_crypttab,
    rewrite_default_grub,
    rewrite_grub_cfg,
    rewrite_grubenv,
    rewrite_initramfs_resume,
    rewrite_kernel_args,
    rewrite_kernel_cmdline,
)
from vmcraft_tasks.craft.fixes.model import RewriteError
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

EFI = "7A1B-2C3D"
BOOT = "5d1a2b3c-aaaa-bbbb-cccc-000000000002"
ROOT = "0b3c6a5e-8f1d-4a4e-9a53-3d2b1f0e9c11"
SWAP = "11111111-2222-3333-4444-555555555555"
LUKS = "c0ffee00-1234-4abc-8def-0123456789ab"

# sda1 EFI, sda2 /boot, sda3 /, sda4 swap, sda5 LUKS, sda6 LVM PV, sda7 unformatted.
FILESYSTEMS = [
    Filesystem(1, "vfat", uuid=EFI),
    Filesystem(2, "ext4", uuid=BOOT),
    Filesystem(3, "ext4", uuid=ROOT),
    Filesystem(4, "swap", uuid=SWAP),
    Filesystem(5, "crypto_LUKS", uuid=LUKS),
    Filesystem(6, "LVM2_member", uuid="pv-uuid-aaaa"),
    Filesystem(7, None),
]
PARTITIONS = [Partition(n, 2048 * n, 2048, 512, "8300", "gpt") for n in range(1, 8)]
DEVICES = DeviceMap(FILESYSTEMS, PARTITIONS, root_partition=3)

RewriteFn = Callable[[str, DeviceMap], Rewritten]


def _reasons(result: Rewritten) -> list[str]:
    return [entry.reason for entry in result[2]]


def _assert_idempotent(rewrite: RewriteFn, text: str) -> None:
    once = rewrite(text, DEVICES)[0]
    again, changes, left = rewrite(once, DEVICES)
    assert again == once
    assert changes == []
    assert len(left) == len(rewrite(text, DEVICES)[2])  # the same names stay unresolved


# -- kernel arguments ---------------------------------------------------------------


def test_root_and_resume_arguments_become_uuid() -> None:
    args, reasons, left = rewrite_kernel_args(
        "ro root=/dev/sda3 quiet resume=/dev/sda4 splash", DEVICES
    )
    assert args == f"ro root=UUID={ROOT} quiet resume=UUID={SWAP} splash"
    assert reasons == [
        "root=/dev/sda3: /dev/sda3 is partition 3; its name changes on KVM",
        "resume=/dev/sda4: /dev/sda4 is partition 4; its name changes on KVM",
    ]
    assert left == []


@pytest.mark.parametrize("device", ["/dev/hda3", "/dev/xvda3", "/dev/nvme0n1p3"])
def test_other_hypervisor_names_are_rewritten(device: str) -> None:
    args, _, left = rewrite_kernel_args(f"root={device} ro", DEVICES)
    assert args == f"root=UUID={ROOT} ro" and left == []


@pytest.mark.parametrize(
    "args",
    [
        f"root=UUID={ROOT} ro resume=UUID={SWAP}",
        "root=LABEL=rootfs ro",
        "root=/dev/mapper/rhel-root ro resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root",
        "root=/dev/vg0/root ro",
        "root=/dev/vda3 ro",
        "root=PARTUUID=0a1b2c3d-03 ro",
        "noresume=/dev/sda4 xroot=/dev/sda3 root=/dev/sda3${extra}",
    ],
)
def test_names_that_survive_or_are_not_arguments_are_left(args: str) -> None:
    assert rewrite_kernel_args(args, DEVICES) == (args, [], [])


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ("root=/dev/sdb1", "/dev/sdb1 is on another disk of the guest"),
        ("root=/dev/sda", "/dev/sda is a whole disk, not a partition"),
        ("root=/dev/sda9", "this disk has no partition 9"),
        ("root=/dev/sda2", "the root filesystem was found on partition 3"),
        ("root=/dev/sda6", "partition 6 holds LVM2_member, not a filesystem"),
        ("resume=/dev/sda3", "partition 3 holds ext4, not swap"),
        ("resume=/dev/sda7", "partition 7 holds nothing blkid recognises, not swap"),
        ("root=/dev/disk/by-id/scsi-36000c29f0a1b2c3d-part3", "depend on the guest's hardware"),
    ],
)
def test_unresolvable_arguments_are_left_with_a_reason(args: str, reason: str) -> None:
    new, reasons, left = rewrite_kernel_args(f"ro {args} quiet", DEVICES)
    assert new == f"ro {args} quiet" and reasons == []
    assert [entry.line for entry in left] == [args]
    assert reason in left[0].reason


def test_resume_offset_means_resume_names_the_swap_files_filesystem() -> None:
    args, _, left = rewrite_kernel_args("resume=/dev/sda3 resume_offset=34816", DEVICES)
    assert args == f"resume=UUID={ROOT} resume_offset=34816" and left == []


def test_root_is_not_checked_against_an_unknown_root_partition() -> None:
    devices = DeviceMap(FILESYSTEMS, PARTITIONS)
    assert rewrite_kernel_args("root=/dev/sda2", devices)[0] == f"root=UUID={BOOT}"


def test_cloned_uuid_is_refused() -> None:
    clones = DeviceMap(
        [Filesystem(3, "ext4", uuid=ROOT), Filesystem(2, "ext4", uuid=ROOT.upper())], PARTITIONS
    )
    args, _, left = rewrite_kernel_args("root=/dev/sda3", clones)
    assert args == "root=/dev/sda3"
    assert "shared by partitions 2, 3" in left[0].reason


# -- grub.cfg -------------------------------------------------------------------------

# Debian 12, /boot on sda2, generated with GRUB_DISABLE_LINUX_UUID=true.
DEBIAN_GRUB_CFG = """\
#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
#

### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
set default="0"
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
function gfxmode {
\tset gfxpayload="${1}"
\tif [ "${1}" = "keep" ]; then
\t\tset vt_handoff=vt.handoff=7
\telse
\t\tset vt_handoff=
\tfi
}
set linux_gfx_mode=
export linux_gfx_mode
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os \
$menuentry_id_option 'gnulinux-simple-/dev/sda3' {
\tload_video
\tinsmod gzio
\tif [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
\tinsmod part_gpt
\tinsmod ext2
\tset root='hd0,gpt2'
\tif [ x$feature_platform_search_hint = xy ]; then
\t  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,gpt2 --hint-efi=hd0,gpt2 \
--hint-baremetal=ahci0,gpt2  5d1a2b3c-aaaa-bbbb-cccc-000000000002
\telse
\t  search --no-floppy --fs-uuid --set=root 5d1a2b3c-aaaa-bbbb-cccc-000000000002
\tfi
\techo\t'Loading Linux 6.1.0-18-amd64 ...'
\tlinux\t/vmlinuz-6.1.0-18-amd64 root=/dev/sda3 ro  quiet resume=/dev/sda4
\techo\t'Loading initial ramdisk ...'
\tinitrd\t/initrd.img-6.1.0-18-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced' {
\tmenuentry 'Debian GNU/Linux, with Linux 6.1.0-18-amd64 (recovery mode)' --class debian {
\t\tset root='hd0,gpt2'
\t\tlinux\t/vmlinuz-6.1.0-18-amd64 root=/dev/sda3 ro single dis_ucode_ldr
\t\tinitrd\t/initrd.img-6.1.0-18-amd64
\t}
}
### END /etc/grub.d/10_linux ###
"""


def test_debian_grub_cfg_kernel_lines_only() -> None:
    new, changes, left = rewrite_grub_cfg(DEBIAN_GRUB_CFG, DEVICES)
    assert new == (
        DEBIAN_GRUB_CFG.replace(
            "root=/dev/sda3 ro  quiet resume=/dev/sda4",
            f"root=UUID={ROOT} ro  quiet resume=UUID={SWAP}",
        ).replace("root=/dev/sda3 ro single", f"root=UUID={ROOT} ro single")
    )
    assert [(c.before, c.after) for c in changes] == [
        (
            "\tlinux\t/vmlinuz-6.1.0-18-amd64 root=/dev/sda3 ro  quiet resume=/dev/sda4",
            f"\tlinux\t/vmlinuz-6.1.0-18-amd64 root=UUID={ROOT} ro  quiet resume=UUID={SWAP}",
        ),
        (
            "\t\tlinux\t/vmlinuz-6.1.0-18-amd64 root=/dev/sda3 ro single dis_ucode_ldr",
            f"\t\tlinux\t/vmlinuz-6.1.0-18-amd64 root=UUID={ROOT} ro single dis_ucode_ldr",
        ),
    ]
    assert "partition 4" in changes[0].reason and left == []
    # The GRUB device names and the menu ids are not kernel arguments.
    assert new.count("set root='hd0,gpt2'") == 2
    assert "'gnulinux-simple-/dev/sda3'" in new
    _assert_idempotent(rewrite_grub_cfg, DEBIAN_GRUB_CFG)


# RHEL 8's BLS grub.cfg: the fallback kernelopts when grubenv has none.
RHEL8_GRUB_CFG = """\
set root='hd0,msdos1'
set boot='hd0,msdos1'
if [ -z "${kernelopts}" ]; then
  set kernelopts="root=/dev/sda3 ro crashkernel=auto resume=/dev/sda4 rhgb quiet "
fi
set root=/dev/sda3
insmod blscfg
blscfg
"""


def test_grub_set_lines_with_kernel_args_are_rewritten_but_never_set_root() -> None:
    new, changes, left = rewrite_grub_cfg(RHEL8_GRUB_CFG, DEVICES)
    assert new == RHEL8_GRUB_CFG.replace(
        '"root=/dev/sda3 ro crashkernel=auto resume=/dev/sda4',
        f'"root=UUID={ROOT} ro crashkernel=auto resume=UUID={SWAP}',
    )
    assert len(changes) == 1 and left == []
    assert "set root=/dev/sda3\n" in new


def test_grub_legacy_kernel_line() -> None:
    menu = (
        "default=0\ntimeout=5\ntitle CentOS 6 (2.6.32-754.el6.x86_64)\n"
        "\troot (hd0,1)\n\tkernel /vmlinuz-2.6.32-754.el6.x86_64 ro root=/dev/sda3 rhgb quiet\n"
        "\tinitrd /initramfs-2.6.32-754.el6.x86_64.img\n"
    )
    new, changes, _ = rewrite_grub_cfg(menu, DEVICES)
    assert new == menu.replace("root=/dev/sda3", f"root=UUID={ROOT}")
    assert len(changes) == 1


def test_grub_cfg_unresolved_arguments_are_reported_and_kept() -> None:
    text = "\tlinux16 /vmlinuz root=/dev/sdb3 ro\r\n\tlinuxefi /vmlinuz root=/dev/sda3 ro"
    new, changes, left = rewrite_grub_cfg(text, DEVICES)
    assert new == f"\tlinux16 /vmlinuz root=/dev/sdb3 ro\r\n\tlinuxefi /vmlinuz root=UUID={ROOT} ro"
    assert len(changes) == 1
    assert [entry.line for entry in left] == ["root=/dev/sdb3"]


def test_efi_stub_grub_cfg_is_unchanged() -> None:
    stub = (
        "search --no-floppy --fs-uuid --set=dev 5d1a2b3c-aaaa-bbbb-cccc-000000000002\n"
        "set prefix=($dev)/grub2\nexport $prefix\nconfigfile $prefix/grub.cfg\n"
    )
    assert rewrite_grub_cfg(stub, DEVICES) == (stub, [], [])


def test_non_utf8_bytes_and_odd_separators_stay_exact() -> None:
    # Only "\n" ends a line: after the vertical tab this is still the comment line.
    raw = b"# caf\xe9\x0b linux /vmlinuz root=/dev/sda3\nlinux /vmlinuz root=/dev/sda3 \xff\n"
    text = raw.decode("utf-8", errors="surrogateescape")
    new, changes, _ = rewrite_grub_cfg(text, DEVICES)
    assert new.encode("utf-8", errors="surrogateescape") == (
        b"# caf\xe9\x0b linux /vmlinuz root=/dev/sda3\n"
        + f"linux /vmlinuz root=UUID={ROOT} ".encode()
        + b"\xff\n"
    )
    assert len(changes) == 1


# -- /etc/default/grub --------------------------------------------------------------

DEFAULT_GRUB = """\
# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.
GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet splash acpi_osi=\\"Windows 2015\\" resume=/dev/sda4"
GRUB_CMDLINE_LINUX='root=/dev/sda3 console=ttyS0,115200'
#GRUB_CMDLINE_LINUX="root=/dev/sda9"
export GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT \\
  resume=/dev/sda4"
GRUB_DISABLE_LINUX_UUID=true
"""


def test_default_grub_quoted_escaped_and_continued_values() -> None:
    new, changes, left = rewrite_default_grub(DEFAULT_GRUB, DEVICES)
    assert new == DEFAULT_GRUB.replace("resume=/dev/sda4", f"resume=UUID={SWAP}").replace(
        "'root=/dev/sda3 ", f"'root=UUID={ROOT} "
    )
    assert [c.before for c in changes] == [
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet splash acpi_osi=\\"Windows 2015\\" resume=/dev/sda4"',
        "GRUB_CMDLINE_LINUX='root=/dev/sda3 console=ttyS0,115200'",
        'export GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT \\\n  resume=/dev/sda4"',
    ]
    assert (changes[2].after or "").endswith(f'resume=UUID={SWAP}"')
    assert '#GRUB_CMDLINE_LINUX="root=/dev/sda9"' in new  # comments are not settings
    assert left == []
    _assert_idempotent(rewrite_default_grub, DEFAULT_GRUB)


def test_default_grub_unquoted_and_unresolved() -> None:
    text = "GRUB_CMDLINE_LINUX=root=/dev/sda3 GRUB_X=1\nGRUB_CMDLINE_LINUX_DEFAULT=resume=/dev/sdc2"
    new, changes, left = rewrite_default_grub(text, DEVICES)
    assert new == (
        f"GRUB_CMDLINE_LINUX=root=UUID={ROOT} GRUB_X=1\nGRUB_CMDLINE_LINUX_DEFAULT=resume=/dev/sdc2"
    )
    assert len(changes) == 1
    assert [entry.line for entry in left] == ["resume=/dev/sdc2"]


def test_default_grub_assignment_inside_another_value_is_not_one() -> None:
    text = 'GRUB_CMDLINE_LINUX="quiet\nGRUB_CMDLINE_LINUX_DEFAULT=root=/dev/sda3"\n'
    # The inner line is part of the first value: the kernel gets one argument
    # "GRUB_CMDLINE_LINUX_DEFAULT=root=/dev/sda3", which is not root=.
    assert rewrite_default_grub(text, DEVICES) == (text, [], [])


def test_default_grub_unterminated_quote_is_refused() -> None:
    with pytest.raises(RewriteError, match="unterminated"):
        rewrite_default_grub('GRUB_CMDLINE_LINUX="root=/dev/sda3\n', DEVICES)


# -- BLS entries, grubenv, /etc/kernel/cmdline --------------------------------------

RHEL9_BLS = """\
title Red Hat Enterprise Linux (5.14.0-362.8.1.el9_3.x86_64) 9.3 (Plow)
version 5.14.0-362.8.1.el9_3.x86_64
linux /vmlinuz-5.14.0-362.8.1.el9_3.x86_64
initrd /initramfs-5.14.0-362.8.1.el9_3.x86_64.img $tuned_initrd
options root=/dev/sda3 ro crashkernel=1G-4G:192M,4G-64G:256M,64G-:512M \
resume=/dev/sda4 rhgb quiet $tuned_params
grub_users $grub_users
grub_arg --unrestricted
grub_class rhel
"""


def test_rhel9_bls_entry_options() -> None:
    new, changes, left = rewrite_bls_entry(RHEL9_BLS, DEVICES)
    assert new == RHEL9_BLS.replace("root=/dev/sda3", f"root=UUID={ROOT}").replace(
        "resume=/dev/sda4", f"resume=UUID={SWAP}"
    )
    assert len(changes) == 1 and (changes[0].before or "").startswith("options root=/dev/sda3 ro")
    assert left == []
    _assert_idempotent(rewrite_bls_entry, RHEL9_BLS)


def test_bls_entry_using_kernelopts_is_unchanged() -> None:
    text = "title RHEL 8\nlinux /vmlinuz\noptions $kernelopts $tuned_params\n"
    assert rewrite_bls_entry(text, DEVICES) == (text, [], [])


def _grubenv(*variables: str, size: int = 1024) -> str:
    body = GRUBENV_SIGNATURE + "".join(f"{v}\n" for v in variables)
    return body + "#" * (size - len(body))


def test_rhel8_grubenv_kernelopts_keeps_the_block_size() -> None:
    text = _grubenv(
        "saved_entry=4b9c1e2f0b2d4a6f8e1c2d3b4a5f6e7d-4.18.0-513.5.1.el8_9.x86_64",
        "kernelopts=root=/dev/sda3 ro crashkernel=auto resume=/dev/sda4 rhgb quiet ",
        "boot_success=0",
    )
    new, changes, left = rewrite_grubenv(text, DEVICES)
    assert len(new) == len(text) == 1024
    assert new == _grubenv(
        "saved_entry=4b9c1e2f0b2d4a6f8e1c2d3b4a5f6e7d-4.18.0-513.5.1.el8_9.x86_64",
        f"kernelopts=root=UUID={ROOT} ro crashkernel=auto resume=UUID={SWAP} rhgb quiet ",
        "boot_success=0",
    )
    assert len(changes) == 1 and left == []
    _assert_idempotent(rewrite_grubenv, text)


def test_grubenv_without_room_is_refused() -> None:
    full = _grubenv("kernelopts=root=/dev/sda3 ro", size=len(GRUBENV_SIGNATURE) + 40)
    with pytest.raises(RewriteError, match="padding"):
        rewrite_grubenv(full, DEVICES)
    with pytest.raises(RewriteError, match="not a GRUB environment block"):
        rewrite_grubenv("kernelopts=root=/dev/sda3\n", DEVICES)


def test_grubenv_other_variables_are_not_kernel_args() -> None:
    text = _grubenv("saved_entry=root=/dev/sda3", "tuned_params=")
    assert rewrite_grubenv(text, DEVICES) == (text, [], [])


def test_kernel_cmdline_file() -> None:
    text = "root=/dev/sda3 ro resume=/dev/sda4 rhgb quiet\n"
    new, changes, _ = rewrite_kernel_cmdline(text, DEVICES)
    assert new == f"root=UUID={ROOT} ro resume=UUID={SWAP} rhgb quiet\n"
    assert len(changes) == 1


# -- initramfs-tools resume, crypttab ------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("RESUME=/dev/sda4", f"RESUME=UUID={SWAP}"),
        (
            'RESUME="/dev/sda4"  # set by the installer',
            f'RESUME="UUID={SWAP}"  # set by the installer',
        ),
        ("export RESUME=/dev/hda4", f"export RESUME=UUID={SWAP}"),
        (f"RESUME=UUID={SWAP}", f"RESUME=UUID={SWAP}"),
        ("RESUME=none", "RESUME=none"),
        ("#RESUME=/dev/sda4", "#RESUME=/dev/sda4"),
    ],
)
def test_initramfs_resume(line: str, expected: str) -> None:
    text = f"# resume device\n{line}\n"
    new, changes, left = rewrite_initramfs_resume(text, DEVICES)
    assert new == f"# resume device\n{expected}\n"
    assert len(changes) == (line != expected) and left == []
    _assert_idempotent(rewrite_initramfs_resume, text)


def test_initramfs_resume_unresolved_and_swap_file() -> None:
    new, changes, left = rewrite_initramfs_resume("RESUME=/dev/sda3\n", DEVICES)
    assert (new, changes) == ("RESUME=/dev/sda3\n", [])
    assert _reasons((new, changes, left)) == ["partition 3 holds ext4, not swap"]
    swap_file = "RESUME=/dev/sda3\nRESUME_OFFSET=34816\n"
    assert rewrite_initramfs_resume(swap_file, DEVICES)[0] == (
        f"RESUME=UUID={ROOT}\nRESUME_OFFSET=34816\n"
    )


CRYPTTAB = (
    "# <target name>\t<source device>\t\t<key file>\t<options>\n"
    "sda5_crypt\t/dev/sda5\t\tnone\t\tluks,discard\n"
    "data_crypt  UUID=c0ffee00-0000-4000-8000-000000000000  /etc/keys/data.key  luks\n"
    "cryptswap /dev/sda4 /dev/urandom swap,cipher=aes-xts-plain64,size=256\n"
    "usb_crypt /dev/sdb1 none luks,noauto\n"
    "   \n"
    "home_crypt /dev/sda5 /dev/disk/by-label/usbkey:/home.key luks,keyscript=passdev"
)


def test_crypttab_device_field_only() -> None:
    result = rewrite_crypttab(CRYPTTAB, DEVICES)
    new, changes, left = result
    lines = new.split("\n")
    assert lines[1] == f"sda5_crypt\tUUID={LUKS}\t\tnone\t\tluks,discard"
    assert lines[-1] == (
        f"home_crypt UUID={LUKS} /dev/disk/by-label/usbkey:/home.key luks,keyscript=passdev"
    )
    assert new == CRYPTTAB.replace("\t/dev/sda5\t", f"\tUUID={LUKS}\t").replace(
        "home_crypt /dev/sda5 ", f"home_crypt UUID={LUKS} "
    )
    assert [c.before for c in changes] == [CRYPTTAB.splitlines()[1], CRYPTTAB.splitlines()[-1]]
    # Swap with a random key has no header, so no UUID: it must keep a stable name.
    assert [(entry.line.split()[0], entry.reason) for entry in left] == [
        ("cryptswap", "partition 4 holds swap, not a LUKS container"),
        ("usb_crypt", "/dev/sdb1 is on another disk of the guest"),
    ]
    _assert_idempotent(rewrite_crypttab, CRYPTTAB)


def test_empty_files_are_unchanged() -> None:
    for rewrite in (
        rewrite_grub_cfg,
        rewrite_default_grub,
        rewrite_bls_entry,
        rewrite_kernel_cmdline,
        rewrite_initramfs_resume,
        rewrite_crypttab,
    ):
        assert rewrite("", DEVICES) == ("", [], [])
