"""A guest on LVM boots only if its kernel command lines name LVs the VM has, and its
rebuilt initramfs can activate them: the check of rd.lvm.lv=/root=/resume=, the
command lines as the bootloader files hold them, and the initramfs rebuild with LVM.

No bubblewrap here: the guest's lister and generator are played by the FAKE sandbox
of test_initramfs_regen_logic (an "image" is a text file of the paths it holds).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.test_initramfs_regen_logic import NEW_IMAGE, OLD_IMAGE, FakeSandbox, make_guest
from vmcraft_tasks.craft.fixes import initramfs_regen as regen
from vmcraft_tasks.craft.fixes.bootloader import kernel_cmdlines
from vmcraft_tasks.craft.fixes.initramfs_regen import (
    Generator,
    GeneratorInfo,
    GuestKernel,
    InitramfsError,
    InitramfsRefused,
    dracut_conf_order,
    dracut_omitting,
    generator_argv,
    lvm_refusal,
    parse_initramfs_files,
    regenerate_initramfs,
)
from vmcraft_tasks.craft.fixes.lvmboot import (
    KernelCmdline,
    LVState,
    check_lvm_boot,
    crypttab_names,
    kernel_args,
    lv_mounts,
    lv_of_device,
    read_boot_config,
)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.inspect.fstab import FstabEntry, ResolvedFstabEntry
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.prepare import prepare_guest
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.volumes import LVName, VolumeTable

# rhel_lvm's VM: VG rl with root, swap, var and home, all usable.
RL = [LVState("rl", name) for name in ("home", "root", "swap", "var")]
RHEL_CMDLINE = (
    "root=/dev/mapper/rl-root ro resume=/dev/mapper/rl-swap rd.lvm.lv=rl/root rd.lvm.lv=rl/swap"
)
BLS = "/boot/loader/entries/abc-5.14.conf"


def _check(args: str, lvs=RL, **kwargs) -> list[tuple[str, str, bool]]:
    found = check_lvm_boot([KernelCmdline(BLS, args)], lvs, **kwargs)
    return [(f.argument, f.problem, f.fatal) for f in found]


# --- parsing -----------------------------------------------------------------------


def test_kernel_args_drop_quotes_and_variables() -> None:
    assert kernel_args('"crashkernel=auto rd.lvm.lv=rl/root" $tuned_params quiet;') == [
        "crashkernel=auto",
        "rd.lvm.lv=rl/root",
        "quiet",
    ]


@pytest.mark.parametrize(
    ("device", "named"),
    [
        ("/dev/mapper/rl-root", ("rl", "root")),
        ("/dev/mapper/my--vg-lv--1", ("my-vg", "lv-1")),
        ("/dev/rl/swap", ("rl", "swap")),
        ("/dev/mapper/cryptroot", None),
        ("/dev/mapper/luks-0a0b0c0d-1111-2222-3333-444455556666", None),
        ("/dev/md/root", None),
        ("/dev/disk/by-uuid", None),
        ("/dev/cciss/c0d0p1", None),
        ("/dev/sda3", None),
        ("UUID=abcd", None),
    ],
)
def test_lv_of_device(device: str, named: tuple[str, str] | None) -> None:
    assert lv_of_device(device) == named


def test_crypttab_mappings_are_not_lvs() -> None:
    names = crypttab_names("# name dev\nroot-crypt UUID=x none luks\n\nhome-crypt /dev/sdb1\n")
    assert names == {"root-crypt", "home-crypt"}
    assert lv_of_device("/dev/mapper/root-crypt") == ("root", "crypt")
    assert lv_of_device("/dev/mapper/root-crypt", names) is None
    assert _check("root=/dev/mapper/root-crypt ro", dm_names=names) == []


# --- the check ---------------------------------------------------------------------


def test_rhel_lvm_command_line_is_valid() -> None:
    assert _check(RHEL_CMDLINE) == []
    assert _check("root=/dev/rl/root ro rd.lvm.vg=rl") == []


def test_an_lv_the_vg_lacks_is_fatal_wherever_it_is_named() -> None:
    assert _check(RHEL_CMDLINE + " rd.lvm.lv=rl/nosuch") == [
        (
            "rd.lvm.lv=rl/nosuch",
            "the VM's VG rl has no LV nosuch (its LVs: home, root, swap, var): "
            "dracut waits for /dev/rl/nosuch and drops to its emergency shell",
            True,
        )
    ]
    ((argument, problem, fatal),) = _check("root=/dev/mapper/rl-nosuch ro rd.lvm.vg=rl")
    assert argument == "root=/dev/mapper/rl-nosuch" and fatal
    assert problem.endswith(": the kernel never finds its root filesystem")
    ((argument, problem, fatal),) = _check("root=/dev/rl/root resume=/dev/rl/gone rd.lvm.vg=rl")
    assert argument == "resume=/dev/rl/gone" and fatal
    assert "dracut waits for the resume device" in problem


def test_a_vg_the_vm_lacks() -> None:
    assert _check("root=/dev/vg0/root rd.lvm.vg=vg0") == [
        (
            "root=/dev/vg0/root",
            "the VM has no VG vg0 (its VGs: rl): the kernel never finds its root filesystem",
            True,
        ),
        (
            "rd.lvm.vg=vg0",
            "the VM has no VG vg0 (its VGs: rl): dracut is told to activate a VG the VM "
            "does not have",
            True,
        ),
    ]
    ((_arg, problem, _fatal),) = _check("root=/dev/mapper/rl-root", lvs=[])
    assert problem.startswith("the VM has no LVM at all: no VG rl on any of its disks")


def test_an_lv_with_a_reason_cannot_be_booted_from() -> None:
    thin = [
        *RL[:1],
        LVState("rl", "root", "VG rl: LV root is a thin volume in pool pool00"),
        *RL[2:],
    ]
    found = _check(RHEL_CMDLINE, lvs=thin)
    assert [arg for arg, _problem, fatal in found if fatal] == [
        "root=/dev/mapper/rl-root",
        "rd.lvm.lv=rl/root",
    ]
    assert "LV rl/root cannot be used: VG rl: LV root is a thin volume" in found[0][1]


def test_two_vgs_of_one_name_are_ambiguous() -> None:
    twins = [*RL, LVState("rl", "root")]
    ((argument, problem, _fatal), *_rest) = _check(RHEL_CMDLINE, lvs=twins)
    assert argument == "root=/dev/mapper/rl-root"
    assert problem.startswith("2 VGs named rl in the VM have an LV root")


def test_mapper_names_with_dashes() -> None:
    lvs = [LVState("my-vg", "lv-1")]
    assert _check("root=/dev/mapper/my--vg-lv--1 rd.lvm.lv=my-vg/lv-1", lvs=lvs) == []


def test_rd_lvm_lv_must_cover_the_root_lv() -> None:
    assert _check("root=/dev/mapper/rl-root ro rd.lvm.lv=rl/swap") == [
        (
            "root=/dev/mapper/rl-root",
            "dracut activates only what rd.lvm.lv=/rd.lvm.vg= name (rl/swap): the root LV "
            "rl/root is not among them, so the root never appears",
            True,
        )
    ]
    ((argument, problem, fatal),) = _check(
        "root=/dev/rl/root resume=/dev/rl/swap rd.lvm.lv=rl/root"
    )
    assert argument == "resume=/dev/rl/swap" and fatal and "resume LV rl/swap" in problem
    # root=UUID=... is the root inspection found: the LV it is on must be activated.
    ((argument, problem, fatal),) = _check(
        "root=UUID=1234 rd.lvm.lv=rl/swap", root_lv=("rl", "root")
    )
    assert argument == "root=UUID=1234" and fatal
    assert _check("root=UUID=1234 rd.lvm.lv=rl/root", root_lv=("rl", "root")) == []


def test_no_rd_lvm_at_all_is_a_note() -> None:
    assert _check("root=/dev/mapper/rl-root ro") == [
        (
            "root=/dev/mapper/rl-root",
            "the root is LV rl/root and no rd.lvm.lv= names it: dracut activates every VG "
            "it finds (rd.lvm.lv=rl/root would name it)",
            False,
        )
    ]
    # /etc/default/grub names no root=: nothing to say about it.
    assert _check("crashkernel=auto rd.lvm.lv=rl/swap", root_lv=("rl", "root")) == []


@pytest.mark.parametrize("off", ["rd.lvm=0", "rd_NO_LVM"])
def test_lvm_switched_off_with_the_root_on_lvm(off: str) -> None:
    ((argument, problem, fatal),) = _check(f"root=/dev/rl/root {off}")
    assert (argument, fatal) == (off, True)
    assert problem == "LVM is switched off in the initramfs, but the root is LV rl/root"


def test_initramfs_tools_ignores_rd_lvm() -> None:
    found = _check("root=/dev/mapper/rl-root resume=/dev/rl/gone rd.lvm.lv=rl/nosuch", dracut=False)
    assert [(arg, fatal) for arg, _problem, fatal in found] == [
        ("resume=/dev/rl/gone", False),
        ("rd.lvm.lv=rl/nosuch", False),
    ]
    assert found[1][1].endswith("(initramfs-tools ignores rd.lvm.*: harmless here)")
    # A missing root LV stops every guest.
    ((_arg, _problem, fatal),) = _check("root=/dev/rl/gone", dracut=False)
    assert fatal


def test_old_rd_lvm_spellings_and_a_bare_vg() -> None:
    assert _check("root=/dev/rl/root rd_LVM_LV=rl/root rd_LVM_VG=rl rd.lvm.lv=rl") == []
    assert [arg for arg, _p, _f in _check("root=/dev/rl/root rd_LVM_LV=rl/x rd.lvm.lv=vg9")] == [
        "rd_LVM_LV=rl/x",
        "rd.lvm.lv=vg9",
        "root=/dev/rl/root",  # and neither activates the root LV
    ]


def test_a_finding_is_reported_once_per_file() -> None:
    lines = [KernelCmdline("/boot/grub2/grub.cfg", "root=/dev/rl/x ro")] * 3
    lines.append(KernelCmdline("/etc/kernel/cmdline", "root=/dev/rl/x ro"))
    found = check_lvm_boot(lines, RL)
    assert [f.path for f in found if f.fatal] == ["/boot/grub2/grub.cfg", "/etc/kernel/cmdline"]
    assert str(found[0]).startswith("/boot/grub2/grub.cfg: root=/dev/rl/x: the VM's VG rl")
    assert found[0].to_dict()["fatal"] is True


# --- the command lines of a guest --------------------------------------------------


def test_kernel_cmdlines_are_found_where_the_fixes_look() -> None:
    grub_cfg = (
        'set kernelopts="root=/dev/mapper/rl-root ro rd.lvm.lv=rl/root "\n'
        "set root='hd0,gpt2'\n"
        "menuentry 'x' {\n\tlinux /vmlinuz-5 root=/dev/rl/root ro\n\tinitrd /initrd\n}\n"
    )
    assert kernel_cmdlines(grub_cfg, "grub-cfg") == [
        '"root=/dev/mapper/rl-root ro rd.lvm.lv=rl/root "',
        " root=/dev/rl/root ro",
    ]
    assert kernel_cmdlines("title x\noptions root=/dev/rl/root ro\n", "bls-entry") == [
        "root=/dev/rl/root ro"
    ]
    grubenv = "# GRUB Environment Block\nkernelopts=root=/dev/rl/root ro \n####\n"
    assert kernel_cmdlines(grubenv, "grubenv") == ["root=/dev/rl/root ro "]
    default = 'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="rd.lvm.lv=rl/root\n  rd.lvm.lv=rl/swap"\n'
    assert kernel_cmdlines(default, "grub-default") == ['"rd.lvm.lv=rl/root\n  rd.lvm.lv=rl/swap"']
    assert kernel_cmdlines('GRUB_CMDLINE_LINUX="unterminated\n', "grub-default") == [
        '"unterminated'
    ]
    assert kernel_cmdlines("root=/dev/rl/root\n", "kernel-cmdline") == ["root=/dev/rl/root"]


def _files(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_read_boot_config_walks_the_bootloader_files(tmp_path: Path) -> None:
    root = _files(
        tmp_path,
        {
            "/etc/default/grub": f'GRUB_CMDLINE_LINUX="{RHEL_CMDLINE.split(" ", 2)[-1]}"\n',
            "/etc/default/grub.d/50-x.cfg": 'GRUB_CMDLINE_LINUX_DEFAULT="rd.lvm.lv=rl/var"\n',
            BLS: f"title x\noptions {RHEL_CMDLINE}\n",
            "/boot/efi/EFI/rocky/grub.cfg": "\tlinux /vmlinuz root=/dev/rl/root\n",
            "/boot/grub2/grubenv": "# GRUB Environment Block\nsaved_entry=x\n",
            "/etc/crypttab": "luks-home UUID=x none\n",
        },
    )
    config = read_boot_config(GuestFS(str(root)))
    assert [c.path for c in config.cmdlines] == [
        "/boot/efi/EFI/rocky/grub.cfg",
        "/etc/default/grub",
        "/etc/default/grub.d/50-x.cfg",
        BLS,
    ]
    assert config.cmdlines[3].args == RHEL_CMDLINE
    assert config.dm_names == {"luks-home"} and config.notes == ()
    found = check_lvm_boot(config.cmdlines, RL)
    assert [(f.path, f.fatal) for f in found] == [("/boot/efi/EFI/rocky/grub.cfg", False)]


def test_an_unreadable_bootloader_file_is_said(tmp_path: Path) -> None:
    _files(tmp_path, {"/etc/kernel/cmdline": "x" * (2 * 1024 * 1024)})  # past the text cap
    config = read_boot_config(GuestFS(str(tmp_path)))
    assert config.cmdlines == ()
    (note,) = config.notes
    assert note.startswith("/etc/kernel/cmdline: not examined for kernel command lines: ")


def test_read_boot_config_of_a_guest_symlinking_out_stays_inside(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/kernel").mkdir()
    (tmp_path / "etc/kernel/cmdline").symlink_to("/proc/cmdline")  # the HOST's, if followed
    assert read_boot_config(GuestFS(str(tmp_path))).cmdlines == ()


def _fstab_entry(spec: str, mountpoint: str, resolved: int | None) -> ResolvedFstabEntry:
    entry = FstabEntry(spec, mountpoint, "ext4", ("defaults",), 0, 0)
    return ResolvedFstabEntry(entry, "device", resolved, "lvm")


def test_lv_mounts_from_the_volume_table_or_the_fstab() -> None:
    table = VolumeTable.build(
        [[Partition(1, 2048, 2048, 512, "8300", "gpt")]],
        [LVName("rl", "root", "u"), LVName("rl", "usr", "u")],
    )
    root, usr = (table.lvs_named("rl", name)[0].number for name in ("root", "usr"))
    info = OSInfo(
        root_partition=root,
        type="linux",
        fstab=(
            _fstab_entry("/dev/mapper/rl-root", "/", root),
            _fstab_entry("/dev/rl/usr", "/usr", usr),
        ),
    )
    assert lv_mounts(info, table) == {"/": ("rl", "root"), "/usr": ("rl", "usr")}
    lvs = [LVState("rl", "root"), LVState("rl", "usr")]
    assert lv_mounts(info, None, lvs) == {"/": ("rl", "root"), "/usr": ("rl", "usr")}
    assert lv_mounts(info, None, lvs[:1]) == {"/": ("rl", "root")}
    plain = OSInfo(root_partition=1, type="linux", fstab=(_fstab_entry("UUID=x", "/", 1),))
    assert lv_mounts(plain, table) == {}


# --- the initramfs: pure pieces ----------------------------------------------------

DRACUT = GeneratorInfo(Generator.DRACUT, "/usr/bin/dracut", "/usr/bin/lsinitrd")
TOOLS = GeneratorInfo(Generator.INITRAMFS_TOOLS, "/usr/sbin/mkinitramfs", "/usr/bin/lsinitramfs")
EL9 = "5.14.0-362.el9.x86_64"
KERNEL = GuestKernel(EL9, f"/boot/vmlinuz-{EL9}", True)
NEED = "/ is on LV rl/root"


def test_dracut_is_asked_for_the_lvm_module() -> None:
    argv = generator_argv(DRACUT, KERNEL, "/boot/new.img", lvm=True)
    assert argv[argv.index("--add") + 1] == "lvm"
    assert "--no-hostonly" in argv  # the sandbox has no active LVM for hostonly to see
    assert "--add" not in generator_argv(DRACUT, KERNEL, "/boot/new.img")
    assert generator_argv(TOOLS, KERNEL, "/boot/new", lvm=True) == generator_argv(
        TOOLS, KERNEL, "/boot/new"
    )


def test_listings_show_the_lvm_binary() -> None:
    wanted = ("usr/sbin/lvm", "sbin/lvm")
    lsinitrd = (
        "Image: /boot/initramfs.img: 30M\n========\n"
        "-rwxr-xr-x   1 root  root  2.9M Nov  8 12:00 usr/sbin/lvm\n"
        "lrwxrwxrwx   1 root  root     8 Nov  8 12:00 sbin -> usr/sbin\n"
    )
    assert parse_initramfs_files(lsinitrd, wanted) == {"usr/sbin/lvm"}
    assert parse_initramfs_files("./sbin/lvm\nusr/lib/x.ko\n", wanted) == {"sbin/lvm"}
    assert parse_initramfs_files("/usr/sbin/lvm\n", wanted) == {"usr/sbin/lvm"}
    assert parse_initramfs_files("usr/sbin/lvmetad\nusr/sbin/lvm.conf\n", wanted) == set()


def test_dracut_config_order_and_omits() -> None:
    order = dracut_conf_order(["01-dist.conf", "lvm.conf"], ["lvm.conf", "99-x.conf", "notes"])
    assert order == [
        "/etc/dracut.conf",
        "/usr/lib/dracut/dracut.conf.d/01-dist.conf",
        "/etc/dracut.conf.d/99-x.conf",
        "/etc/dracut.conf.d/lvm.conf",  # masks /usr/lib's file of that name
    ]
    omit = ("/etc/dracut.conf.d/no-lvm.conf", 'omit_dracutmodules+=" lvm "\n')
    assert dracut_omitting([("/etc/dracut.conf", "# empty\n"), omit], "lvm") == omit[0]
    assert (
        dracut_omitting([omit, ("/etc/dracut.conf.d/z.conf", "omit_dracutmodules+=' nfs '")], "lvm")
        == omit[0]
    )
    reset = ("/etc/dracut.conf.d/z.conf", 'omit_dracutmodules="nfs"\n')
    assert dracut_omitting([omit, reset], "lvm") is None
    assert (
        dracut_omitting([("/etc/dracut.conf", "omit_dracutmodules=lvm\n")], "lvm")
        == "/etc/dracut.conf"
    )
    assert (
        dracut_omitting([("/etc/dracut.conf", 'omit_dracutmodules+=" lvmmerge "\n')], "lvm") is None
    )


def _refusal(kind: Generator, **facts) -> str | None:
    defaults = {
        "has_lvm": True,
        "has_dracut_module": True,
        "omitted_by": None,
        "has_lvm2_hook": True,
    }
    return lvm_refusal(kind, NEED, **{**defaults, **facts})


def test_lvm_refusals_name_the_file_and_what_is_needed() -> None:
    assert _refusal(Generator.DRACUT) is None
    assert _refusal(Generator.DRACUT, omitted_by="/etc/dracut.conf.d/x.conf") == (
        "/ is on LV rl/root, but /etc/dracut.conf.d/x.conf omits the dracut module lvm "
        "(omit_dracutmodules): remove lvm from omit_dracutmodules there so the initramfs "
        "can activate LVM"
    )
    assert "no lvm binary (/usr/sbin/lvm or /sbin/lvm): install lvm2" in (
        _refusal(Generator.DRACUT, has_lvm=False) or ""
    )
    assert "has no lvm module" in (_refusal(Generator.DRACUT, has_dracut_module=False) or "")
    assert _refusal(Generator.DRACUT, has_dracut_module=None) is None  # cannot tell
    assert _refusal(Generator.INITRAMFS_TOOLS, has_lvm2_hook=False) == (
        "/ is on LV rl/root, but the guest has no /usr/share/initramfs-tools/hooks/lvm2: "
        "install lvm2 in the guest (its initramfs-tools hook puts lvm in the initramfs)"
    )
    assert _refusal(Generator.INITRAMFS_TOOLS, has_lvm=False, omitted_by="x") is None
    assert _refusal(Generator.MKINITRD, has_lvm=False) is None  # checked after the build


# --- the initramfs rebuild ---------------------------------------------------------

HOST = os.uname().machine
LVM_IMAGE = NEW_IMAGE + "usr/sbin/lvm\n"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeSandbox]:
    def install(root: Path, **kwargs: object) -> FakeSandbox:
        sandbox = FakeSandbox(root, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(regen, "run_sandboxed", sandbox)
        return sandbox

    return install


def _exe(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)


def lvm_guest(root: Path, generator: str = "dracut", *, image: str = OLD_IMAGE) -> Path:
    make_guest(root, generator=generator, image=image)
    _exe(root / "usr/sbin/lvm")
    if generator == "dracut":
        (root / "usr/lib/dracut/modules.d/90lvm").mkdir(parents=True)
        (root / "etc/dracut.conf.d").mkdir(parents=True)
    else:
        _exe(root / "usr/share/initramfs-tools/hooks/lvm2")
    return root


def test_dracut_rebuild_adds_lvm_and_checks_the_image(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = lvm_guest(tmp_path / "g")
    sandbox = fake(root, new_image=LVM_IMAGE)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True, needs_lvm=NEED)
    (argv,) = sandbox.generator_calls()
    assert argv[argv.index("--add") + 1] == "lvm"
    (result,) = report.kernels
    assert result.action == "rebuilt" and result.verified
    assert (result.lvm_before, result.lvm_after) == (False, True)
    assert report.lvm == (
        "/ is on LV rl/root: added the dracut module lvm (--add lvm) and checked that each "
        "new image holds the lvm binary"
    )
    assert report.to_dict()["kernels"][0]["lvm_after"] is True


def test_an_image_without_lvm_is_not_installed(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = lvm_guest(tmp_path / "g")
    fake(root, new_image=NEW_IMAGE)
    (kernel,) = os.listdir(root / "usr/lib/modules")
    live = root / f"boot/initramfs-{kernel}.img"
    before = live.read_text()
    with pytest.raises(InitramfsError, match="has no lvm binary") as caught:
        regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True, needs_lvm=NEED)
    assert "/ is on LV rl/root" in caught.value.reason
    assert live.read_text() == before  # the old image stays
    assert caught.value.report is not None
    assert caught.value.report.kernels[0].lvm_after is None


def test_a_dracut_config_omitting_lvm_is_refused(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = lvm_guest(tmp_path / "g")
    (root / "etc/dracut.conf.d/10-no-lvm.conf").write_text('omit_dracutmodules+=" lvm "\n')
    sandbox = fake(root, new_image=LVM_IMAGE)
    with pytest.raises(InitramfsRefused, match=r"10-no-lvm\.conf omits the dracut module lvm"):
        regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True, needs_lvm=NEED)
    assert sandbox.calls == []
    # Without a root on LVM the same guest is rebuilt as before.
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True)
    assert report.lvm is None and report.kernels[0].lvm_after is None


def test_a_guest_without_lvm2_is_refused(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = lvm_guest(tmp_path / "g")
    (root / "usr/sbin/lvm").unlink()
    fake(root)
    with pytest.raises(InitramfsRefused, match="no lvm binary"):
        regenerate_initramfs(str(root), arch=HOST, dry_run=True, needs_lvm=NEED)


def test_initramfs_tools_needs_the_lvm2_hook(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = lvm_guest(tmp_path / "g", generator="initramfs-tools")
    sandbox = fake(root, new_image=LVM_IMAGE)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True, needs_lvm=NEED)
    assert report.kernels[0].lvm_after is True
    assert "--add" not in sandbox.generator_calls()[0]
    assert (
        report.lvm
        == "/ is on LV rl/root: each new image was checked for the lvm binary (usr/sbin/lvm)"
    )
    (root / "usr/share/initramfs-tools/hooks/lvm2").unlink()
    with pytest.raises(InitramfsRefused, match="hooks/lvm2: install lvm2"):
        regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True, needs_lvm=NEED)


def test_a_dry_run_says_what_would_be_added(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = lvm_guest(tmp_path / "g", image=OLD_IMAGE + "usr/sbin/lvm\n")
    sandbox = fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=True, force=True, needs_lvm=NEED)
    assert sandbox.generator_calls() == []
    (result,) = report.kernels
    assert result.action == "would-rebuild" and result.lvm_before is True
    assert report.lvm is not None and "would add the dracut module lvm (--add lvm)" in report.lvm


def test_an_image_without_lvm_is_not_up_to_date(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = lvm_guest(tmp_path / "g", image=NEW_IMAGE)  # virtio already, no lvm
    fake(root, new_image=LVM_IMAGE)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False, needs_lvm=NEED)
    assert report.kernels[0].action == "rebuilt"
    again = regenerate_initramfs(str(root), arch=HOST, dry_run=False, needs_lvm=NEED)
    assert again.kernels[0].action == "up-to-date" and again.kernels[0].lvm_after is True


# --- prepare_guest: the verdict ----------------------------------------------------


def _lvm_vm() -> tuple[VolumeTable, list[Filesystem], list[Partition]]:
    disks = [[Partition(n, 2048 * n, 2048, 512, "8300", "gpt") for n in (1, 2, 3)]]
    table = VolumeTable.build(disks, [LVName("rl", n, "vg-u") for n in ("root", "swap", "var")])
    root = table.lvs_named("rl", "root")[0].number
    filesystems = [
        Filesystem(2, "ext4", uuid="b00b0000-0000-4000-8000-000000000002"),
        Filesystem(3, "LVM2_member", uuid="pv"),
        Filesystem(root, "xfs", uuid="a0000000-0000-4000-8000-000000100000"),
    ]
    return table, filesystems, table.vm_partitions(disks)


def _rocky_on_lvm(tmp_path: Path, cmdline: str) -> tuple[Path, OSInfo]:
    root = lvm_guest(tmp_path / "g", image=NEW_IMAGE)
    table, _fs, _parts = _lvm_vm()
    number = table.lvs_named("rl", "root")[0].number
    _files(
        root,
        {
            "/etc/fstab": (
                "/dev/mapper/rl-root / xfs defaults 0 0\n/dev/sda2 /boot ext4 defaults 1 2\n"
            ),
            BLS: f"title Rocky\noptions {cmdline}\n",
        },
    )
    fstab = (_fstab_entry("/dev/mapper/rl-root", "/", number),)
    info = OSInfo(
        root_partition=number, type="linux", distro="rocky", major=9, arch=HOST, fstab=fstab
    )
    return root, info


def test_prepare_a_guest_on_lvm(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root, info = _rocky_on_lvm(tmp_path, RHEL_CMDLINE)
    sandbox = fake(root, new_image=LVM_IMAGE)
    table, filesystems, partitions = _lvm_vm()
    lvs = [LVState("rl", "root"), LVState("rl", "swap"), LVState("rl", "var")]
    prep = prepare_guest(
        str(root), info, filesystems, partitions, mode="apply", volumes=table, lvs=lvs
    )
    assert prep.problem is None, prep.problem
    assert "--add" in sandbox.generator_calls()[0]
    assert prep.initramfs is not None and prep.initramfs.kernels[0].lvm_after is True
    assert "initramfs: / is on LV rl/root: added the dracut module lvm" in " ".join(prep.notes)
    # The fstab's /boot on the boot disk became a UUID; the LVM name stayed.
    assert (root / "etc/fstab").read_text().splitlines() == [
        "/dev/mapper/rl-root / xfs defaults 0 0",
        "UUID=b00b0000-0000-4000-8000-000000000002 /boot ext4 defaults 1 2",
    ]
    assert prep.lvm_boot == ()
    assert prep.to_dict()["lvm_boot"] == []


def test_prepare_fails_a_guest_naming_an_lv_the_vm_lacks(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root, info = _rocky_on_lvm(tmp_path, RHEL_CMDLINE + " rd.lvm.lv=rl/nosuch")
    fake(root, new_image=LVM_IMAGE)
    table, filesystems, partitions = _lvm_vm()
    lvs = [LVState("rl", "root"), LVState("rl", "swap")]
    prep = prepare_guest(
        str(root), info, filesystems, partitions, mode="off", volumes=table, lvs=lvs
    )
    assert prep.problem is not None
    assert (
        f"kernel command line: {BLS}: rd.lvm.lv=rl/nosuch: the VM's VG rl has no LV nosuch"
        in prep.problem
    )
    assert [f.argument for f in prep.lvm_boot] == ["rd.lvm.lv=rl/nosuch"]
    # A dry run reports it as what a real run would fail on.
    dry = prepare_guest(
        str(root), info, filesystems, partitions, mode="dry_run", volumes=table, lvs=lvs
    )
    assert dry.problem is None
    assert any("a real run would fail: kernel command line:" in n for n in dry.notes)
    assert any("would add the dracut module lvm" in n for n in dry.notes)


def test_prepare_fails_a_guest_whose_dracut_omits_lvm(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root, info = _rocky_on_lvm(tmp_path, RHEL_CMDLINE)
    (root / "etc/dracut.conf.d/no-lvm.conf").write_text('omit_dracutmodules+=" lvm "\n')
    sandbox = fake(root, new_image=LVM_IMAGE)
    table, filesystems, partitions = _lvm_vm()
    prep = prepare_guest(
        str(root), info, filesystems, partitions, mode="apply", volumes=table, lvs=RL
    )
    assert prep.problem is not None
    assert "initramfs: / is on LV rl/root, but /etc/dracut.conf.d/no-lvm.conf omits" in prep.problem
    assert sandbox.generator_calls() == []


def test_prepare_without_lvs_does_not_look_at_lvm(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root, info = _rocky_on_lvm(tmp_path, "root=/dev/mapper/rl-nosuch ro")
    sandbox = fake(root, new_image=NEW_IMAGE)
    _table, filesystems, partitions = _lvm_vm()
    prep = prepare_guest(str(root), info, filesystems, partitions, mode="apply")
    assert prep.lvm_boot == () and prep.problem is None, prep.problem
    assert "--add" not in sandbox.generator_calls()[0]
