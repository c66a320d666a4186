"""Debian 12 on a 6-partition GPT disk (ESP vfat, /boot and / ext4, /var xfs, /home btrfs,
swap), an fstab naming filesystems in every style, symlinks that point out of the
guest; raw, and converted to qcow2, vmdk, vhdx and vpc."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

LINUX_ID = 1
DEBIAN_KERNEL = "6.1.0-18-amd64"
LINUX_DISK_SIZE_MIB = 772  # 770 MiB of partitions + 1 MiB GPT head + 1 MiB tail

DEBIAN_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""

DPKG_STATUS = """\
Package: base-files
Status: install ok installed
Priority: required
Section: admin
Installed-Size: 341
Maintainer: Santiago Vila <sanvila@debian.org>
Architecture: amd64
Version: 12.4+deb12u5
Description: Debian base system miscellaneous files

Package: openssh-server
Status: install ok installed
Priority: optional
Section: net
Installed-Size: 1949
Maintainer: Debian OpenSSH Maintainers <debian-ssh@lists.debian.org>
Architecture: amd64
Source: openssh
Version: 1:9.2p1-2+deb12u2
Depends: openssh-client (= 1:9.2p1-2+deb12u2), libc6 (>= 2.36)
Description: secure shell (SSH) server, for secure access from remote machines
 This is the portable version of OpenSSH.

Package: linux-image-6.1.0-18-amd64
Status: install ok installed
Priority: optional
Section: kernel
Architecture: amd64
Source: linux-signed-amd64 (6.1.76+1)
Version: 6.1.76-1
Description: Linux 6.1 for 64-bit PCs (signed)

Package: nano
Status: deinstall ok config-files
Priority: important
Section: editors
Architecture: amd64
Version: 7.2-1
Description: small, friendly text editor inspired by Pico
"""

NETWORK_INTERFACES = """\
# This file describes the network interfaces available on your system
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug ens3
iface ens3 inet static
    address 192.0.2.10/24
    gateway 192.0.2.1
"""

GUEST_PASSWD = "root:x:0:0:GUEST-PASSWD-MARKER:/root:/bin/bash\n"
GUEST_SHADOW = "root:GUEST-SHADOW-MARKER:19700:0:99999:7:::\n"
VAR_LOG_MESSAGES = "Mar  1 12:00:00 web01 kernel: vmcraft-test marker: var partition log\n"
HOME_NOTES = "notes on the home partition (btrfs)\n"


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    fs_uuid = {n: tk.fs_uuid(LINUX_ID, n) for n in (2, 3, 4, 5, 6)}
    fs_uuid[1] = "1234-ABCD"  # vfat volume id, as blkid reports it
    partuuid = {n: tk.gpt_uuid(LINUX_ID, n) for n in range(1, 7)}
    labels = {1: "ESP", 2: "boot", 3: "rootfs", 4: "var", 5: "home", 6: "swap"}
    partnames = {1: "esp", 2: "boot", 3: "root", 4: "var", 5: "home", 6: "swap"}
    fs_types = {1: "vfat", 2: "ext4", 3: "ext4", 4: "xfs", 5: "btrfs", 6: "swap"}
    sizes = {1: 64, 2: 100, 3: 150, 4: 320, 5: 120, 6: 16}
    mountpoints = {1: "/boot/efi", 2: "/boot", 3: "/", 4: "/var", 5: "/home", 6: "swap"}

    fstab = (
        "# /etc/fstab: static file system information.\n"
        "# <file system> <mount point>   <type>  <options>       <dump>  <pass>\n"
        "proc /proc proc defaults 0 0\n"
        "/dev/sda3 / ext4 errors=remount-ro 0 1\n"
        f"UUID={fs_uuid[2]} /boot ext4 defaults 0 2\n"
        "/dev/sda1 /boot/efi vfat umask=0077 0 1\n"
        "LABEL=var /var xfs defaults 0 2\n"
        f"PARTUUID={partuuid[5]} /home btrfs defaults 0 0\n"
        f"/dev/disk/by-uuid/{fs_uuid[6]} none swap sw 0 0\n"
    )
    grub_cfg = (
        "set default=0\nset timeout=5\n"
        "menuentry 'Debian GNU/Linux' {\n"
        f"    search --no-floppy --fs-uuid --set=root {fs_uuid[2]}\n"
        f"    linux /vmlinuz-{DEBIAN_KERNEL} root=/dev/sda3 ro quiet\n"
        f"    initrd /initrd.img-{DEBIAN_KERNEL}\n"
        "}\n"
    )
    ls_elf = Path("/usr/bin/true").read_bytes()

    esp_files: dict[str, str | bytes] = {
        "/EFI/debian/grubx64.efi": "dummy grubx64.efi for vmcraft tests\n",
    }
    boot_files: dict[str, str | bytes] = {
        f"/vmlinuz-{DEBIAN_KERNEL}": f"dummy kernel {DEBIAN_KERNEL}\n",
        f"/initrd.img-{DEBIAN_KERNEL}": f"dummy initrd {DEBIAN_KERNEL}\n",
        "/grub/grub.cfg": grub_cfg,
    }
    root_files: dict[str, str | bytes] = {
        "/usr/lib/os-release": DEBIAN_OS_RELEASE,
        "/etc/hostname": "web01\n",
        "/etc/debian_version": "12.5\n",
        "/etc/machine-id": "0d15c0de0d15c0de0d15c0de0d15c0de\n",
        "/etc/fstab": fstab,
        "/etc/network/interfaces": NETWORK_INTERFACES,
        "/etc/passwd": GUEST_PASSWD,
        "/etc/shadow": GUEST_SHADOW,
        "/var/lib/dpkg/status": DPKG_STATUS,
        "/usr/bin/ls": ls_elf,
    }
    root_symlinks = {
        "/etc/os-release": "../usr/lib/os-release",
        "/bin": "usr/bin",
        "/sbin": "usr/sbin",
        "/lib": "usr/lib",
        "/lib64": "usr/lib64",
        "/etc/evil_abs": "/etc/shadow",
        "/etc/evil_rel": "../../../../../../../etc/passwd",
        "/root/escape_dir": "/",
    }
    var_files: dict[str, str | bytes] = {
        "/log/messages": VAR_LOG_MESSAGES,
        # Also here: with /var mounted, this is the copy a guest would really read.
        "/lib/dpkg/status": DPKG_STATUS,
    }
    home_files: dict[str, str | bytes] = {"/user/notes.txt": HOME_NOTES}

    root_src = work / "root"
    tk.write_tree(root_src, root_files, root_symlinks)
    for d in ("boot/efi", "home", "proc", "sys", "dev", "run", "tmp", "usr/sbin", "usr/lib64"):
        (root_src / d).mkdir(parents=True, exist_ok=True)
    (root_src / "usr/bin/ls").chmod(0o755)
    (root_src / "etc/shadow").chmod(0o640)
    boot_src, var_src, home_src = work / "boot", work / "var", work / "home"
    tk.write_tree(boot_src, boot_files, {})
    (boot_src / "efi").mkdir()  # where the ESP mounts, as on a real Debian /boot
    tk.write_tree(var_src, var_files, {})
    tk.write_tree(home_src, home_files, {})

    fs = {n: work / f"p{n}.img" for n in range(1, 7)}
    tk.mkfs_vfat(fs[1], sizes[1], labels[1], "1234ABCD", files=esp_files, fat=32)
    tk.mkfs_ext4(fs[2], sizes[2], labels[2], fs_uuid[2], boot_src)
    tk.mkfs_ext4(fs[3], sizes[3], labels[3], fs_uuid[3], root_src)
    tk.mkfs_xfs(fs[4], sizes[4], labels[4], fs_uuid[4], var_src)
    tk.mkfs_btrfs(fs[5], sizes[5], labels[5], fs_uuid[5], home_src)
    tk.mkswap(fs[6], sizes[6], labels[6], fs_uuid[6])

    types = {1: tk.GPT_ESP, 6: tk.GPT_LINUX_SWAP}
    parts = [
        tk.Part(sizes[n], types.get(n, tk.GPT_LINUX_FS), fs[n], partnames[n], partuuid[n])
        for n in range(1, 7)
    ]
    disk = out / "linux-gpt.raw"
    layout = tk.assemble(disk, LINUX_DISK_SIZE_MIB, "gpt", tk.gpt_uuid(LINUX_ID, 0), parts)
    for n, info in layout.items():
        info.update(fstype=fs_types[n], label=labels[n], uuid=fs_uuid[n])

    per_fs_files = {1: esp_files, 2: boot_files, 3: root_files, 4: var_files, 5: home_files}
    guest_files: dict[str, str] = {}
    for n, files in per_fs_files.items():
        prefix = "" if mountpoints[n] == "/" else mountpoints[n]
        guest_files.update({prefix + p: c for p, c in tk.text_files(files).items()})
    notes: dict[str, Any] = {
        "table": "gpt",
        "disk_guid": tk.gpt_uuid(LINUX_ID, 0),
        "virtual_size": LINUX_DISK_SIZE_MIB * tk.MiB,
        "partition_count": 6,
        "partitions": layout,
        "fs_types": fs_types,
        "labels": labels,
        "fs_uuids": fs_uuid,
        "partuuids": partuuid,
        "partnames": partnames,
        "mountpoints": mountpoints,
        "root_partition": 3,
        "files": {n: tk.text_files(files) for n, files in per_fs_files.items()},
        "guest_files": guest_files,
        "file_sha256": {"/usr/bin/ls": hashlib.sha256(ls_elf).hexdigest()},
        "elf_files": ["/usr/bin/ls"],
        "symlinks": root_symlinks,
        "escape_symlinks": {
            p: t for p, t in root_symlinks.items() if p.startswith(("/etc/evil", "/root/"))
        },
        "guest_markers": {
            "/etc/passwd": "GUEST-PASSWD-MARKER",
            "/etc/shadow": "GUEST-SHADOW-MARKER",
        },
        "os_release": tk.parse_os_release(DEBIAN_OS_RELEASE),
        "hostname": "web01",
        "debian_version": "12.5",
        "kernel_version": DEBIAN_KERNEL,
        "fstab": fstab,
        "installed_packages": {
            "base-files": "12.4+deb12u5",
            "openssh-server": "1:9.2p1-2+deb12u2",
            "linux-image-6.1.0-18-amd64": "6.1.76-1",
        },
        "config_files_only_packages": {"nano": "7.2-1"},
        "dpkg_status_on": {3: "/var/lib/dpkg/status", 4: "/lib/dpkg/status"},
    }
    return disk.name, "raw", notes


def linux_gpt_raw() -> BuiltImage:
    return tk.cached("linux-gpt-raw", _build, sources=(__file__,))


def _converted(name: str, fmt: str, suffix: str, options: list[str]) -> BuiltImage:
    # Resolved before cached() takes the lock: flock is per open file, so building
    # the raw image from inside this build would deadlock on our own lock.
    raw = linux_gpt_raw()

    def build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
        built = tk.convert(raw, out / f"linux-gpt.{suffix}", fmt, options)
        return Path(built.path).name, built.fmt, built.notes

    return tk.cached(name, build, sources=(__file__,))


def linux_gpt_qcow2() -> BuiltImage:
    return _converted("linux-gpt-qcow2", "qcow2", "qcow2", [])


def linux_gpt_vmdk() -> BuiltImage:
    return _converted("linux-gpt-vmdk", "vmdk", "vmdk", [])


def linux_gpt_vhdx() -> BuiltImage:
    return _converted("linux-gpt-vhdx", "vhdx", "vhdx", [])


def linux_gpt_vpc() -> BuiltImage:
    # force_size keeps the exact raw size; CHS rounding would move the backup GPT.
    return _converted("linux-gpt-vpc", "vpc", "vhd", ["-o", "subformat=dynamic,force_size=on"])
