"""Per-distro fixers on fake guest trees: what changes, dry runs, and guest symlinks."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.fixes import distros
from vmcraft_tasks.craft.fixes.bootloader import initramfs_copy_note
from vmcraft_tasks.craft.fixes.distros import (
    AlmaFixer,
    CentosFixer,
    DebianFixer,
    FedoraFixer,
    Fixer,
    GenericLinuxFixer,
    RhelFixer,
    RockyFixer,
    SuseFixer,
    UbuntuFixer,
    apply_fixes,
    fixer_for,
    no_fixer_reason,
)
from vmcraft_tasks.craft.fixes.initramfs import REGENERATE_NOTE
from vmcraft_tasks.craft.fixes.model import FixReport
from vmcraft_tasks.craft.guestpath import GuestFS, TooManyEntries
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

ROOT = "0b3c6a5e-8f1d-4a4e-9a53-3d2b1f0e9c11"
BOOT = "5d1a2b3c-aaaa-bbbb-cccc-000000000002"
SWAP = "11111111-2222-3333-4444-555555555555"
FILESYSTEMS = [
    Filesystem(1, "ext4", uuid=ROOT),
    Filesystem(2, "ext4", uuid=BOOT),
    Filesystem(5, "swap", uuid=SWAP),
]
PARTITIONS = [Partition(n, 2048 * n, 2048, 512, "83", "dos", extended=n == 3) for n in (1, 2, 3, 5)]


def _linux(distro: str | None, root_partition: int = 1) -> OSInfo:
    return OSInfo(root_partition=root_partition, type="linux", distro=distro)


def _write(root: Path, path: str, text: str, mode: int | None = None) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    if mode is not None:
        target.chmod(mode)
    return target


def _link(root: Path, path: str, target: str) -> None:
    link = root / path.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root`: type, mode, mtime and content or link target."""
    found: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content: Any = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = Path(path).read_bytes()
            else:
                content = None
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, content)
    found["."] = (os.lstat(root).st_mode, os.lstat(root).st_mtime_ns, None)
    return found


def _changed(report: FixReport) -> list[tuple[str, str]]:
    return [(r.name, r.path) for r in report.applied if r.changed]


DEBIAN_FSTAB = (
    "# <file system> <mount point> <type> <options> <dump> <pass>\n"
    "/dev/sda1 /               ext4    errors=remount-ro 0       1\n"
    f"UUID={BOOT} /boot ext4 defaults 0 2\n"
    "/dev/sda5       none            swap    sw              0       0\n"
    "/dev/sdb1 /data ext4 defaults 0 2\n"
    "/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto     0       0\n"
)
DEBIAN_INTERFACES = (
    "source /etc/network/interfaces.d/*\n\n"
    "auto lo\niface lo inet loopback\n\n"
    "allow-hotplug ens192\niface ens192 inet dhcp\n"
    "    hwaddress ether 00:50:56:aa:bb:cc\n"
)
DEBIAN_NETPLAN = (
    "network:\n  version: 2\n  ethernets:\n    ens192:\n"
    "      match:\n        macaddress: 00:50:56:aa:bb:cc\n"
    "      set-name: ens192\n      dhcp4: true\n"
)


@pytest.fixture
def debian(tmp_path: Path) -> Path:
    root = tmp_path / "debian"
    _write(root, "/etc/fstab", DEBIAN_FSTAB)
    _write(root, "/etc/network/interfaces", DEBIAN_INTERFACES)
    _write(
        root,
        "/etc/network/interfaces.d/eth1",
        "iface eth1 inet manual\n  hwaddress 00:50:56:01:02:03\n",
    )
    _write(root, "/etc/netplan/50-cloud-init.yaml", DEBIAN_NETPLAN, mode=0o600)
    _write(root, "/etc/initramfs-tools/modules", "# modules\nvirtio_blk\n")
    _write(
        root,
        "/etc/udev/rules.d/70-persistent-net.rules",
        'SUBSYSTEM=="net", ATTR{address}=="00:50:56:aa:bb:cc", NAME="eth0"\n',
    )
    unit_dir = "/lib/systemd/system"
    for unit in ("open-vm-tools.service", "vgauth.service", "ssh.service"):
        _write(root, f"{unit_dir}/{unit}", f"[Unit]\nDescription={unit}\n")
    wants = "/etc/systemd/system/multi-user.target.wants"
    _link(root, f"{wants}/open-vm-tools.service", f"{unit_dir}/open-vm-tools.service")
    _link(root, f"{wants}/ssh.service", f"{unit_dir}/ssh.service")
    _link(
        root,
        "/etc/systemd/system/open-vm-tools.service.requires/vgauth.service",
        f"{unit_dir}/vgauth.service",
    )
    _write(root, "/etc/init.d/vmware-tools", "#!/bin/sh\n")
    _link(root, "/etc/rc2.d/S01vmware-tools", "../init.d/vmware-tools")
    _link(root, "/etc/rc0.d/K01vmware-tools", "../init.d/vmware-tools")
    return root


def test_debian_tree_is_fixed(debian: Path) -> None:
    report = apply_fixes(
        GuestFS(str(debian)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False
    )
    assert report.fixer == "debian" and not report.dry_run and report.failed == ()

    fstab = (debian / "etc/fstab").read_text().splitlines()
    assert fstab[1] == f"UUID={ROOT} /               ext4    errors=remount-ro 0       1"
    assert fstab[3] == f"UUID={SWAP}       none            swap    sw              0       0"
    assert fstab[0] == DEBIAN_FSTAB.splitlines()[0]
    assert fstab[4] == "/dev/sdb1 /data ext4 defaults 0 2"  # another disk: left ...
    assert [s.reason for s in report.skipped] == [  # ... and reported
        "/dev/sdb1 /data ext4 defaults 0 2: /dev/sdb1 is on another disk of the guest "
        "(/ is on /dev/sda)"
    ]

    assert "hwaddress" not in (debian / "etc/network/interfaces").read_text()
    assert "hwaddress" not in (debian / "etc/network/interfaces.d/eth1").read_text()
    netplan = debian / "etc/netplan/50-cloud-init.yaml"
    assert yaml.safe_load(netplan.read_text())["network"]["ethernets"] == {
        "ens192": {"dhcp4": True}
    }
    assert stat.S_IMODE(netplan.stat().st_mode) == 0o600
    assert "ATTR{address}" not in (debian / "etc/udev/rules.d/70-persistent-net.rules").read_text()
    assert (debian / "etc/initramfs-tools/modules").read_text() == (
        "# modules\nvirtio_blk\nvirtio_scsi\nvirtio_net\nvirtio_pci\n"
    )

    wants = debian / "etc/systemd/system/multi-user.target.wants"
    assert sorted(os.listdir(wants)) == ["ssh.service"]
    assert os.listdir(debian / "etc/systemd/system/open-vm-tools.service.requires") == []
    assert (debian / "lib/systemd/system/open-vm-tools.service").is_file()  # unit kept
    assert not os.path.lexists(debian / "etc/rc2.d/S01vmware-tools")
    assert os.path.islink(debian / "etc/rc0.d/K01vmware-tools")
    assert (debian / "etc/init.d/vmware-tools").is_file()

    removed = {r.path: r.before for r in report.applied if r.name == "vmware-tools"}
    assert removed == {
        "/etc/systemd/system/multi-user.target.wants/open-vm-tools.service": (
            "/lib/systemd/system/open-vm-tools.service"
        ),
        "/etc/systemd/system/open-vm-tools.service.requires/vgauth.service": (
            "/lib/systemd/system/vgauth.service"
        ),
        "/etc/rc2.d/S01vmware-tools": "../init.d/vmware-tools",
    }
    assert REGENERATE_NOTE in report.notes
    assert any("MAC-address pinning" in note for note in report.notes)
    assert not any("dracut" in name for name, _ in _changed(report))
    json.dumps(report.to_dict())  # the report travels as JSON


def test_debian_fixes_are_idempotent(debian: Path) -> None:
    fs = GuestFS(str(debian))
    apply_fixes(fs, _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False)
    again = apply_fixes(fs, _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False)
    assert _changed(again) == []
    assert REGENERATE_NOTE not in again.notes


def test_dry_run_writes_nothing_and_reports_the_same(debian: Path) -> None:
    before = _snapshot(debian)
    dry = apply_fixes(GuestFS(str(debian)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=True)
    assert _snapshot(debian) == before
    assert dry.dry_run and "dry run: nothing was written" in dry.notes
    real = apply_fixes(
        GuestFS(str(debian)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False
    )
    assert _changed(dry) == _changed(real)
    assert [r.after for r in dry.applied] == [r.after for r in real.applied]
    assert len(_changed(dry)) == 9


IFCFG = "DEVICE=eth0\nHWADDR=00:50:56:AA:BB:CC\nBOOTPROTO=dhcp\nONBOOT=yes\n"
KEYFILE = (
    "[connection]\nid=ens192\nuuid=3c2f9c1e-0000-4000-8000-000000000001\ntype=ethernet\n\n"
    "[ethernet]\nmac-address=00:50:56:AA:BB:CC\n\n[ipv4]\nmethod=auto\n"
)


@pytest.fixture
def rocky(tmp_path: Path) -> Path:
    root = tmp_path / "rocky"
    _write(
        root,
        "/etc/fstab",
        f"UUID={ROOT} / xfs defaults 0 0\n/dev/sda2 /boot ext4 defaults 1 2\n"
        "/dev/sda5 swap swap defaults 0 0\n",
    )
    _write(root, "/etc/sysconfig/network-scripts/ifcfg-eth0", IFCFG)
    _write(root, "/etc/sysconfig/network-scripts/ifcfg-lo", "DEVICE=lo\nIPADDR=127.0.0.1\n")
    _write(root, "/etc/NetworkManager/system-connections/ens192.nmconnection", KEYFILE, mode=0o600)
    (root / "etc/dracut.conf.d").mkdir(parents=True)
    _write(root, "/etc/selinux/config", "SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    _write(root, "/usr/lib/systemd/system/vmtoolsd.service", "[Unit]\n")
    wants = "/etc/systemd/system/multi-user.target.wants"
    _link(root, f"{wants}/vmtoolsd.service", "/usr/lib/systemd/system/vmtoolsd.service")
    _link(root, f"{wants}/vgauthd.service", "/usr/lib/systemd/system/vgauthd.service")
    return root


ROCKY_FS = [Filesystem(1, "xfs", uuid=ROOT), *FILESYSTEMS[1:]]
DRACUT_CONF = "etc/dracut.conf.d/90-vmcraft-virtio.conf"


def test_rocky_tree_is_fixed(rocky: Path) -> None:
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    assert report.fixer == "rocky" and report.skipped == () and report.failed == ()
    assert (rocky / "etc/fstab").read_text() == (
        f"UUID={ROOT} / xfs defaults 0 0\nUUID={BOOT} /boot ext4 defaults 1 2\n"
        f"UUID={SWAP} swap swap defaults 0 0\n"
    )
    ifcfg = rocky / "etc/sysconfig/network-scripts/ifcfg-eth0"
    assert ifcfg.read_text() == "DEVICE=eth0\nBOOTPROTO=dhcp\nONBOOT=yes\n"
    keyfile = rocky / "etc/NetworkManager/system-connections/ens192.nmconnection"
    assert "mac-address" not in keyfile.read_text()
    # NetworkManager ignores keyfiles readable by others: the mode must survive.
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert (
        (rocky / DRACUT_CONF)
        .read_text()
        .endswith('add_drivers+=" virtio_blk virtio_scsi virtio_net virtio_pci virtio_console "\n')
    )
    assert os.listdir(rocky / "etc/systemd/system/multi-user.target.wants") == []
    created = [r for r in report.applied if r.before is None]
    assert [r.path for r in created] == ["/" + DRACUT_CONF]
    assert REGENERATE_NOTE in report.notes
    assert any(n.startswith("SELinux is enforcing") and DRACUT_CONF in n for n in report.notes)


def test_rocky_dry_run_creates_nothing(rocky: Path) -> None:
    before = _snapshot(rocky)
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=True)
    assert _snapshot(rocky) == before
    assert not (rocky / DRACUT_CONF).exists()
    assert ("dracut-virtio", "/" + DRACUT_CONF) in _changed(report)


def test_dracut_conf_dir_is_created_when_dracut_is_installed(rocky: Path) -> None:
    (rocky / "etc/dracut.conf.d").rmdir()
    _write(rocky, "/etc/dracut.conf", "")
    apply_fixes(GuestFS(str(rocky)), _linux("rhel"), ROCKY_FS, PARTITIONS, dry_run=False)
    assert (rocky / DRACUT_CONF).is_file()


def test_no_initramfs_generator_is_reported(rocky: Path) -> None:
    (rocky / "etc/dracut.conf.d").rmdir()
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("virtio-initramfs", "no initramfs generator found (looked for dracut)")
    ]


# -- guest symlinks must never reach the host --------------------------------------


def _host_state(path: str) -> tuple[bytes, int, int]:
    st = os.stat(path)
    return hashlib.sha256(Path(path).read_bytes()).digest(), st.st_mtime_ns, st.st_ino


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../../../../../etc/passwd"])
def test_fstab_symlink_is_edited_inside_the_guest(tmp_path: Path, target: str) -> None:
    root = tmp_path / "guest"
    guest_passwd = _write(root, "/etc/passwd", "/dev/sda1 / ext4 defaults 0 1\n")
    _link(root, "/etc/fstab", target)
    host_passwd = _host_state("/etc/passwd")
    siblings = sorted(os.listdir(tmp_path))

    report = apply_fixes(
        GuestFS(str(root)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False
    )

    assert _host_state("/etc/passwd") == host_passwd
    assert guest_passwd.read_text() == f"UUID={ROOT} / ext4 defaults 0 1\n"
    assert os.readlink(root / "etc/fstab") == target  # the link itself is kept
    record = next(r for r in report.applied if r.name == "fstab")
    assert record.path == "/etc/fstab" and record.changed
    assert record.note == "/etc/fstab resolves to /etc/passwd in the guest: edited that"
    assert sorted(os.listdir(tmp_path)) == siblings  # nothing appeared next to the guest


def test_symlink_to_a_host_only_file_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    host_fstab = _write(tmp_path, "/host-fstab", "/dev/sda1 / ext4 defaults 0 1\n")
    _link(root, "/etc/fstab", str(host_fstab))
    host_udev = _write(tmp_path, "/host-rules", 'ATTR{address}=="x", NAME="eth0"\n')
    _link(root, "/etc/udev/rules.d/70-persistent-net.rules", str(host_udev))
    before = _snapshot(tmp_path)

    report = apply_fixes(
        GuestFS(str(root)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False
    )

    assert _snapshot(tmp_path) == before
    reasons = {s.path: s.reason for s in report.skipped}
    assert "does not resolve inside the guest" in reasons["/etc/fstab"]
    assert (
        "does not resolve inside the guest" in reasons["/etc/udev/rules.d/70-persistent-net.rules"]
    )


def test_wants_link_to_host_path_is_removed_target_untouched(tmp_path: Path) -> None:
    root = tmp_path / "guest"
    _write(root, "/etc/fstab", "")
    host_unit = _write(tmp_path, "/host-unit.service", "[Unit]\n")
    _link(root, "/etc/systemd/system/multi-user.target.wants/vmtoolsd.service", str(host_unit))
    # The wants directory itself reached through a guest symlink (absolute: re-rooted).
    _link(
        root,
        "/etc/systemd/system/graphical.target.wants",
        "/etc/systemd/system/multi-user.target.wants",
    )

    report = apply_fixes(
        GuestFS(str(root)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False
    )

    assert host_unit.read_text() == "[Unit]\n"
    assert os.listdir(root / "etc/systemd/system/multi-user.target.wants") == []
    assert [r.path for r in report.applied if r.name == "vmware-tools"] == [
        "/etc/systemd/system/multi-user.target.wants/vmtoolsd.service"
    ]
    assert report.failed == ()


def test_two_names_for_one_file_are_edited_once(rocky: Path) -> None:
    scripts = rocky / "etc/sysconfig/network-scripts"
    (scripts / "ifcfg-alias").symlink_to("ifcfg-eth0")
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=True)
    ifcfg = [r for r in report.applied if r.name == "ifcfg" and r.changed]
    assert len(ifcfg) == 1
    assert ifcfg[0].note == (
        "/etc/sysconfig/network-scripts/ifcfg-alias resolves to "
        "/etc/sysconfig/network-scripts/ifcfg-eth0 in the guest: edited that"
    )


def test_missing_fstab_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    report = apply_fixes(GuestFS(str(root)), _linux(None), FILESYSTEMS, PARTITIONS, dry_run=False)
    assert ("fstab", "/etc/fstab", "not present") in [
        (s.name, s.path, s.reason) for s in report.skipped
    ]
    assert report.fixer == "linux"
    assert "distribution unknown: generic Linux fixes only" in report.notes


def test_write_failure_is_reported_and_other_fixes_continue(
    debian: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = GuestFS(str(debian))
    real_write = fs.write_file

    def refuse_fstab(path: str, data: bytes, *, mode: int | None = None) -> None:
        if path == "/etc/fstab":
            raise GuestPathError(path, "cannot write: Read-only file system")
        real_write(path, data, mode=mode)

    monkeypatch.setattr(fs, "write_file", refuse_fstab)
    report = apply_fixes(fs, _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False)
    assert [(f.name, f.path) for f in report.failed] == [("fstab", "/etc/fstab")]
    assert (debian / "etc/fstab").read_text() == DEBIAN_FSTAB
    assert "hwaddress" not in (debian / "etc/network/interfaces").read_text()


def test_invalid_netplan_is_skipped(debian: Path) -> None:
    _write(debian, "/etc/netplan/99-broken.yaml", "network: [\n")
    report = apply_fixes(
        GuestFS(str(debian)), _linux("ubuntu"), FILESYSTEMS, PARTITIONS, dry_run=False
    )
    broken = [s for s in report.skipped if s.name == "netplan"]
    assert [s.path for s in broken] == ["/etc/netplan/99-broken.yaml"]
    assert report.fixer == "ubuntu"


def test_non_utf8_bytes_survive_an_edit(tmp_path: Path) -> None:
    root = tmp_path / "guest"
    fstab = root / "etc" / "fstab"
    fstab.parent.mkdir(parents=True)
    fstab.write_bytes(b"# caf\xe9 latin-1 comment\n/dev/sda1 / ext4 defaults 0 1\n")
    apply_fixes(GuestFS(str(root)), _linux("debian"), FILESYSTEMS, PARTITIONS, dry_run=False)
    assert (
        fstab.read_bytes()
        == f"# caf\xe9 latin-1 comment\nUUID={ROOT} / ext4 defaults 0 1\n".encode("latin-1")
    )


# -- choosing the fixer -----------------------------------------------------------


@pytest.mark.parametrize(
    ("distro", "cls"),
    [
        ("debian", DebianFixer),
        ("kalilinux", DebianFixer),
        ("ubuntu", UbuntuFixer),
        ("linuxmint", UbuntuFixer),
        ("rhel", RhelFixer),
        ("oraclelinux", RhelFixer),
        ("centos", CentosFixer),
        ("rocky", RockyFixer),
        ("almalinux", AlmaFixer),
        ("fedora", FedoraFixer),
        ("sles", SuseFixer),
        ("opensuse", SuseFixer),
        ("archlinux", GenericLinuxFixer),
        (None, GenericLinuxFixer),
    ],
)
def test_fixer_for_linux(distro: str | None, cls: type[Fixer]) -> None:
    fixer = fixer_for(_linux(distro))
    assert type(fixer) is cls
    assert no_fixer_reason(_linux(distro)) is None


def test_families_share_steps_by_inheritance() -> None:
    assert isinstance(RockyFixer(), RhelFixer) and isinstance(UbuntuFixer(), DebianFixer)
    names = [step.__name__ for step in RockyFixer().steps()]
    assert names[:3] == ["fix_fstab", "fix_udev_net_rules", "disable_vmware_tools"]
    assert "fix_ifcfg" in names and "fix_netplan" not in names
    assert "fix_netplan" in [step.__name__ for step in UbuntuFixer().steps()]
    assert SuseFixer.initramfs_generators == ("dracut",)


@pytest.mark.parametrize("os_type", ["windows", "unknown"])
def test_no_fixer_for_windows_or_unknown(tmp_path: Path, os_type: str) -> None:
    info = OSInfo(root_partition=2, type="windows" if os_type == "windows" else "unknown")
    assert fixer_for(info) is None
    reason = no_fixer_reason(info)
    assert reason is not None
    (tmp_path / "guest").mkdir()
    report = apply_fixes(GuestFS(str(tmp_path / "guest")), info, [], [], dry_run=False)
    assert report.fixer is None and report.applied == () and report.notes == (reason,)
    if os_type == "windows":
        assert "Windows" in reason


# -- boot path: kernel command lines, resume, crypttab -----------------------------

LUKS = "c0ffee00-1234-4abc-8def-0123456789ab"
BOOT_FILESYSTEMS = [*FILESYSTEMS, Filesystem(6, "crypto_LUKS", uuid=LUKS)]
BOOT_PARTITIONS = [*PARTITIONS, Partition(6, 2048 * 6, 2048, 512, "83", "dos")]
BOOT_STEPS = ["fix_kernel_cmdline", "fix_resume", "fix_crypttab"]

DEBIAN_GRUB_CFG = (
    "### BEGIN /etc/grub.d/10_linux ###\n"
    "menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option "
    "'gnulinux-simple' {\n"
    "\tinsmod part_msdos\n"
    "\tset root='hd0,msdos2'\n"
    f"\t  search --no-floppy --fs-uuid --set=root {BOOT}\n"
    "\tlinux\t/vmlinuz-6.1.0-18-amd64 root=/dev/sda1 ro  quiet resume=/dev/sda5\n"
    "\tinitrd\t/initrd.img-6.1.0-18-amd64\n"
    "}\n"
    "menuentry 'Old kernel on the second disk' {\n"
    "\tlinux\t/vmlinuz-5.10.0-28-amd64 root=/dev/sdb1 ro\n"
    "}\n"
)
EFI_STUB = (
    f"search.fs_uuid {BOOT} root hd0,msdos2\n"
    "set prefix=($root)'/grub'\n"
    "configfile $prefix/grub.cfg\n"
)
DEFAULT_GRUB = (
    "GRUB_DEFAULT=0\n"
    'GRUB_CMDLINE_LINUX_DEFAULT="quiet resume=/dev/sda5"\n'
    "GRUB_CMDLINE_LINUX='root=/dev/sda1'\n"
    "GRUB_DISABLE_LINUX_UUID=true\n"
)
CRYPTTAB = (
    "# <target name> <source device> <key file> <options>\n"
    "sda6_crypt /dev/sda6 none luks,discard\n"
    "usb_crypt\t/dev/sdb2\tnone\tluks,noauto\n"
)


@pytest.fixture
def debian_boot(debian: Path) -> Path:
    _write(debian, "/boot/grub/grub.cfg", DEBIAN_GRUB_CFG, mode=0o444)
    _write(debian, "/boot/efi/EFI/debian/grub.cfg", EFI_STUB)
    _write(debian, "/etc/default/grub", DEFAULT_GRUB)
    _write(debian, "/etc/default/grub.d/50-cloudimg.cfg", 'GRUB_CMDLINE_LINUX="root=/dev/sda1"\n')
    _write(debian, "/etc/initramfs-tools/conf.d/resume", "RESUME=/dev/sda5\n")
    _write(debian, "/etc/crypttab", CRYPTTAB)
    return debian


def _boot_records(report: FixReport) -> dict[str, Any]:
    names = {"grub-cfg", "grub-default", "bls-entry", "grubenv", "kernel-cmdline"}
    names |= {"initramfs-resume", "crypttab"}
    return {r.path: r for r in report.applied if r.name in names}


def test_every_linux_fixer_runs_the_boot_path_steps() -> None:
    classes: list[type[Fixer]] = [DebianFixer, UbuntuFixer, RhelFixer, CentosFixer, RockyFixer]
    classes += [AlmaFixer, FedoraFixer, SuseFixer, GenericLinuxFixer, Fixer]
    for cls in classes:
        names = [step.__name__ for step in cls().steps()]
        assert all(name in names for name in BOOT_STEPS), cls
    assert [s.__name__ for s in GenericLinuxFixer().steps()].count("fix_kernel_cmdline") == 1


def test_debian_boot_path_is_fixed(debian_boot: Path) -> None:
    report = apply_fixes(
        GuestFS(str(debian_boot)),
        _linux("debian"),
        BOOT_FILESYSTEMS,
        BOOT_PARTITIONS,
        dry_run=False,
    )
    assert report.failed == ()
    grub_cfg = debian_boot / "boot/grub/grub.cfg"
    assert grub_cfg.read_text() == DEBIAN_GRUB_CFG.replace(
        "root=/dev/sda1 ro  quiet resume=/dev/sda5",
        f"root=UUID={ROOT} ro  quiet resume=UUID={SWAP}",
    )
    assert stat.S_IMODE(grub_cfg.stat().st_mode) == 0o444
    assert (debian_boot / "etc/default/grub").read_text() == (
        "GRUB_DEFAULT=0\n"
        f'GRUB_CMDLINE_LINUX_DEFAULT="quiet resume=UUID={SWAP}"\n'
        f"GRUB_CMDLINE_LINUX='root=UUID={ROOT}'\n"
        "GRUB_DISABLE_LINUX_UUID=true\n"
    )
    assert (debian_boot / "etc/default/grub.d/50-cloudimg.cfg").read_text() == (
        f'GRUB_CMDLINE_LINUX="root=UUID={ROOT}"\n'
    )
    assert (debian_boot / "etc/initramfs-tools/conf.d/resume").read_text() == (
        f"RESUME=UUID={SWAP}\n"
    )
    assert (debian_boot / "etc/crypttab").read_text() == CRYPTTAB.replace(
        " /dev/sda6 ", f" UUID={LUKS} "
    )
    assert (debian_boot / "boot/efi/EFI/debian/grub.cfg").read_text() == EFI_STUB

    records = _boot_records(report)
    assert {path: r.changed for path, r in records.items()} == {
        "/boot/grub/grub.cfg": True,
        "/boot/efi/EFI/debian/grub.cfg": False,
        "/etc/default/grub": True,
        "/etc/default/grub.d/50-cloudimg.cfg": True,
        "/etc/initramfs-tools/conf.d/resume": True,
        "/etc/crypttab": True,
    }
    grub = records["/boot/grub/grub.cfg"]
    assert grub.name == "grub-cfg" and grub.before == DEBIAN_GRUB_CFG
    assert grub.after == grub_cfg.read_text()
    assert [(c.before, c.after) for c in grub.changes] == [
        (
            "\tlinux\t/vmlinuz-6.1.0-18-amd64 root=/dev/sda1 ro  quiet resume=/dev/sda5",
            f"\tlinux\t/vmlinuz-6.1.0-18-amd64 root=UUID={ROOT} ro  quiet resume=UUID={SWAP}",
        )
    ]
    resume = records["/etc/initramfs-tools/conf.d/resume"]
    assert (resume.name, resume.before, resume.after) == (
        "initramfs-resume",
        "RESUME=/dev/sda5\n",
        f"RESUME=UUID={SWAP}\n",
    )
    assert records["/etc/crypttab"].changes[0].after == f"sda6_crypt UUID={LUKS} none luks,discard"

    boot_skips = [(s.name, s.path, s.reason) for s in report.skipped if s.name != "fstab"]
    assert boot_skips == [
        (
            "grub-cfg",
            "/boot/grub/grub.cfg",
            "root=/dev/sdb1: /dev/sdb1 is on another disk of the guest",
        ),
        (
            "crypttab",
            "/etc/crypttab",
            "usb_crypt\t/dev/sdb2\tnone\tluks,noauto: /dev/sdb2 is on another disk of the guest",
        ),
    ]
    assert initramfs_copy_note("/etc/initramfs-tools/conf.d/resume") in report.notes
    assert initramfs_copy_note("/etc/crypttab") in report.notes
    json.dumps(report.to_dict())


def test_debian_boot_path_is_idempotent_and_dry_run_writes_nothing(debian_boot: Path) -> None:
    fs = GuestFS(str(debian_boot))
    before = _snapshot(debian_boot)
    dry = apply_fixes(fs, _linux("debian"), BOOT_FILESYSTEMS, BOOT_PARTITIONS, dry_run=True)
    assert _snapshot(debian_boot) == before
    real = apply_fixes(fs, _linux("debian"), BOOT_FILESYSTEMS, BOOT_PARTITIONS, dry_run=False)
    assert _boot_records(dry).keys() == _boot_records(real).keys()
    assert [r.after for r in _boot_records(dry).values()] == [
        r.after for r in _boot_records(real).values()
    ]
    again = apply_fixes(fs, _linux("debian"), BOOT_FILESYSTEMS, BOOT_PARTITIONS, dry_run=False)
    assert not any(r.changed for r in _boot_records(again).values())
    assert not any("initramfs holds its own copy" in note for note in again.notes)


RHEL9_ENTRY = (
    "title Rocky Linux (5.14.0-362.8.1.el9_3.x86_64) 9.3 (Blue Onyx)\n"
    "version 5.14.0-362.8.1.el9_3.x86_64\n"
    "linux /vmlinuz-5.14.0-362.8.1.el9_3.x86_64\n"
    "initrd /initramfs-5.14.0-362.8.1.el9_3.x86_64.img $tuned_initrd\n"
    "options root=/dev/sda1 ro crashkernel=1G-4G:192M,4G-64G:256M,64G-:512M "
    "resume=/dev/sda5 rhgb quiet $tuned_params\n"
    "grub_users $grub_users\n"
    "grub_arg --unrestricted\n"
    "grub_class rocky\n"
)
GRUBENV_HEAD = (
    "# GRUB Environment Block\n"
    "saved_entry=4b9c1e2f0b2d4a6f8e1c2d3b4a5f6e7d-4.18.0-513.5.1.el8_9.x86_64\n"
)


def _grubenv(kernelopts: str) -> str:
    body = f"{GRUBENV_HEAD}kernelopts={kernelopts}\nboot_success=0\n"
    return body + "#" * (1024 - len(body))


@pytest.fixture
def rocky_boot(rocky: Path) -> Path:
    entries = "/boot/loader/entries"
    machine = "4b9c1e2f0b2d4a6f8e1c2d3b4a5f6e7d"
    _write(rocky, f"{entries}/{machine}-5.14.0-362.8.1.el9_3.x86_64.conf", RHEL9_ENTRY)
    _write(
        rocky,
        f"{entries}/{machine}-0-rescue.conf",
        RHEL9_ENTRY.replace("root=/dev/sda1", "root=/dev/sda2"),
    )
    _write(rocky, f"{entries}/README", "root=/dev/sda1\n")
    # On EFI RHEL 8 keeps grubenv on the ESP and links to it from /boot/grub2.
    _write(rocky, "/boot/efi/EFI/rocky/grubenv", _grubenv("root=/dev/sda1 ro resume=/dev/sda5"))
    _link(rocky, "/boot/grub2/grubenv", "../efi/EFI/rocky/grubenv")
    _write(rocky, "/etc/kernel/cmdline", "root=/dev/sda1 ro resume=/dev/sda5\n")
    return rocky


def test_rocky_bls_grubenv_and_kernel_cmdline_are_fixed(rocky_boot: Path) -> None:
    report = apply_fixes(
        GuestFS(str(rocky_boot)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False
    )
    assert report.failed == ()
    entries = rocky_boot / "boot/loader/entries"
    current = entries / "4b9c1e2f0b2d4a6f8e1c2d3b4a5f6e7d-5.14.0-362.8.1.el9_3.x86_64.conf"
    assert current.read_text() == RHEL9_ENTRY.replace(
        "root=/dev/sda1", f"root=UUID={ROOT}"
    ).replace("resume=/dev/sda5", f"resume=UUID={SWAP}")
    # The rescue entry's root= contradicts the root found on partition 1: left, reported.
    rescue = entries / "4b9c1e2f0b2d4a6f8e1c2d3b4a5f6e7d-0-rescue.conf"
    assert "root=/dev/sda2 " in rescue.read_text()
    assert (entries / "README").read_text() == "root=/dev/sda1\n"  # not an entry

    grubenv = rocky_boot / "boot/efi/EFI/rocky/grubenv"
    assert os.path.islink(rocky_boot / "boot/grub2/grubenv")
    assert grubenv.read_text() == _grubenv(f"root=UUID={ROOT} ro resume=UUID={SWAP}")
    assert grubenv.stat().st_size == 1024
    assert (rocky_boot / "etc/kernel/cmdline").read_text() == (
        f"root=UUID={ROOT} ro resume=UUID={SWAP}\n"
    )

    records = _boot_records(report)
    assert records["/boot/grub2/grubenv"].note == (
        "/boot/grub2/grubenv resolves to /boot/efi/EFI/rocky/grubenv in the guest: edited that"
    )
    assert [(r.name, r.changed) for r in records.values()] == [
        ("bls-entry", True),
        ("bls-entry", True),  # resume= in the rescue entry still maps
        ("grubenv", True),
        ("kernel-cmdline", True),
    ]
    assert [(s.name, s.reason) for s in report.skipped] == [
        (
            "bls-entry",
            "root=/dev/sda2: /dev/sda2 is partition 2 but the root filesystem was found on "
            "partition 1: the guest's disk names cannot be trusted",
        )
    ]
    assert not any("initramfs holds its own copy" in note for note in report.notes)


def test_grubenv_without_room_is_skipped_byte_exact(rocky: Path) -> None:
    full = "# GRUB Environment Block\nkernelopts=root=/dev/sda1\n"
    _write(rocky, "/boot/grub2/grubenv", full)
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    assert (rocky / "boot/grub2/grubenv").read_text() == full
    assert [(s.name, s.path) for s in report.skipped] == [("grubenv", "/boot/grub2/grubenv")]
    assert "padding" in report.skipped[0].reason


# --- bounded walks of guest directories -----------------------------------------------

WIFI_IFCFG = "DEVICE=wlan0\nTYPE=Wireless\nHWADDR=00:50:56:aa:bb:cc\nWPA_PSK='rocky-wifi-psk'\n"


def _many_ifcfg(root: Path, count: int, *, linked: bool = False) -> Path:
    scripts = root / "etc/sysconfig/network-scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = scripts / f"ifcfg-eth{i}"
        if linked and i:
            # Hard links to one file: 20 000 directory entries in well under a second.
            os.link(scripts / "ifcfg-eth0", name)
        else:
            name.write_text(f"DEVICE=eth{i}\nHWADDR=00:50:56:00:{i % 256:02x}:01\n")
    return scripts


def test_a_directory_over_the_entry_limit_is_skipped_whole(rocky: Path) -> None:
    # 20 000 ifcfg files (a hostile guest could hold a million): the walk reads at most
    # MAX_DIR_ENTRIES + 1 names, skips the directory with a reason, and the report stays
    # small while every other fix still runs.
    scripts = _many_ifcfg(rocky, 20_000, linked=True)
    before = (scripts / "ifcfg-eth7").read_text()
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    (skip,) = [s for s in report.skipped if s.name == "ifcfg"]
    assert skip.path == "/etc/sysconfig/network-scripts"
    assert skip.reason.startswith(f"more than {distros.MAX_DIR_ENTRIES} entries: not examined")
    assert report.failed == ()
    assert (scripts / "ifcfg-eth7").read_text() == before  # not walked, not touched
    assert ("fstab", "/etc/fstab") in _changed(report)  # the other fixes ran
    assert len(json.dumps(report.to_dict())) < 200_000


def test_spent_walk_budgets_give_skips_not_silent_cuts(
    rocky: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FAKE limits, small enough for a small tree: 40 entries per directory, 25 files.
    monkeypatch.setattr(distros, "MAX_DIR_ENTRIES", 40)
    monkeypatch.setattr(distros, "MAX_WALK_FILES", 25)
    _many_ifcfg(rocky, 30)  # 31 files with the fixture's ifcfg-lo: under the entry limit
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    walked = [r for r in report.applied if r.name == "ifcfg"]
    assert len(walked) == 25
    (skip,) = [s for s in report.skipped if s.name == "ifcfg"]
    assert skip.reason.startswith("6 more files not examined: the fixes' budget (25 files")
    # The budget was spent: the NetworkManager directory after it is skipped too.
    (nm,) = [s for s in report.skipped if s.name == "nm-keyfile"]
    assert nm.path == "/etc/NetworkManager/system-connections"


def test_walk_text_budget(rocky: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distros, "MAX_WALK_TEXT", 500)  # FAKE: about 10 small files
    _many_ifcfg(rocky, 50)
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    walked = [r for r in report.applied if r.name == "ifcfg"]
    assert 5 < len(walked) < 20
    assert any(s.name == "ifcfg" and "more files not examined" in s.reason for s in report.skipped)


def test_total_entry_budget_covers_every_directory(
    rocky: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distros, "MAX_WALK_ENTRIES", 10)  # FAKE
    for i in range(12):
        _link(rocky, f"/etc/systemd/system/t{i}.target.wants/x.service", "/dev/null")
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    reasons = [s.reason for s in report.skipped]
    assert any("budget of 10 directory entries is spent" in reason for reason in reasons)


def test_secrets_reach_the_guest_but_not_the_report(rocky: Path) -> None:
    _write(rocky, "/etc/sysconfig/network-scripts/ifcfg-wlan0", WIFI_IFCFG)
    keyfile = KEYFILE + "\n[wifi-security]\nkey-mgmt=wpa-psk\npsk=rocky-nm-psk-1\n"
    _write(rocky, "/etc/NetworkManager/system-connections/ens192.nmconnection", keyfile)
    report = apply_fixes(GuestFS(str(rocky)), _linux("rocky"), ROCKY_FS, PARTITIONS, dry_run=False)
    assert "HWADDR" not in (rocky / "etc/sysconfig/network-scripts/ifcfg-wlan0").read_text()
    # The fix wrote the real text: the guest keeps its secrets.
    assert (
        "WPA_PSK='rocky-wifi-psk'"
        in (rocky / "etc/sysconfig/network-scripts/ifcfg-wlan0").read_text()
    )
    nm = (rocky / "etc/NetworkManager/system-connections/ens192.nmconnection").read_text()
    assert "psk=rocky-nm-psk-1" in nm
    # The report (JSON files, the Redis job record) never holds them.
    text = json.dumps(report.to_dict())
    assert "rocky-wifi-psk" not in text and "rocky-nm-psk-1" not in text
    assert "WPA_PSK=<redacted>" in text and "psk=<redacted>" in text


def test_bounded_ls_reads_at_most_limit_plus_one(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / name).write_text("")
    fs = GuestFS(str(tmp_path))
    assert fs.ls("/", limit=3) == ["a", "b", "c"]
    with pytest.raises(TooManyEntries, match="more than 2 entries") as caught:
        fs.ls("/", limit=2)
    assert isinstance(caught.value, GuestPathError) and caught.value.limit == 2
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(TooManyEntries):
            fs.ls("/", limit=0)
    assert len(os.listdir("/proc/self/fd")) == fds  # the directory is closed every time
