"""An Ubuntu 22.04 server on GPT with ten partitions (/, /boot, /home, /var, /tmp, /opt,
/srv, /var/log, /usr/local as ext4, and swap), every one named by UUID in fstab: the
performance guide's 10-partition migration workflow.

`Fs` and `make_filesystems` make any such layout (small_mbr uses them too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.toolkit import BuiltImage

TEN_ID = 0x0B10
UBUNTU_KERNEL = "5.15.0-91-generic"

UBUNTU_OS_RELEASE = """\
PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
UBUNTU_CODENAME=jammy
"""

DPKG_STATUS = """\
Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12ubuntu4.6

Package: openssh-server
Status: install ok installed
Architecture: amd64
Version: 1:8.9p1-3ubuntu0.6

Package: linux-image-5.15.0-91-generic
Status: install ok installed
Architecture: amd64
Version: 5.15.0-91.101
"""


@dataclass(frozen=True)
class Fs:
    mountpoint: str  # "swap" for the swap partition
    label: str
    size_mib: int
    files: dict[str, str | bytes] = field(default_factory=dict)


def _ten_layout() -> list[Fs]:
    """A realistic Ubuntu server: / with a small Linux tree, nine other partitions."""
    elf = Path("/usr/bin/true").read_bytes()
    root: dict[str, str | bytes] = {
        "/usr/lib/os-release": UBUNTU_OS_RELEASE,
        "/etc/lsb-release": "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=22.04\n",
        "/etc/debian_version": "bookworm/sid\n",
        "/etc/hostname": "app10\n",
        "/etc/hosts": "127.0.0.1 localhost\n127.0.1.1 app10\n",
        "/etc/passwd": (
            "root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n"
        ),
        "/etc/group": "root:x:0:\nubuntu:x:1000:\n",
        "/etc/apt/sources.list": "deb http://archive.ubuntu.com/ubuntu jammy main\n",
        "/var/lib/dpkg/status": DPKG_STATUS,
        "/usr/bin/ls": elf,
    }
    return [
        Fs("/", "rootfs", 64, root),
        Fs(
            "/boot",
            "boot",
            32,
            {
                f"/vmlinuz-{UBUNTU_KERNEL}": "dummy kernel\n",
                f"/initrd.img-{UBUNTU_KERNEL}": "dummy initrd\n",
                "/grub/grub.cfg": f"linux /vmlinuz-{UBUNTU_KERNEL} root=LABEL=rootfs ro\n",
            },
        ),
        Fs("/home", "home", 24, {"/ubuntu/.profile": "# ~/.profile\n"}),
        Fs("/var", "var", 32, {"/lib/dpkg/status": DPKG_STATUS, "/cache/apt/.keep": ""}),
        Fs("/tmp", "tmp", 16),
        Fs("/opt", "opt", 16, {"/app/bin/run.sh": "#!/bin/sh\nexec /opt/app/bin/app\n"}),
        Fs("/srv", "srv", 16, {"/www/index.html": "<h1>app10</h1>\n"}),
        Fs("/var/log", "varlog", 16, {"/syslog": "Jan  1 00:00:00 app10 kernel: boot\n"}),
        Fs(
            "/usr/local", "usrlocal", 16, {"/bin/backup.sh": "#!/bin/sh\ntar czf /srv/b.tgz /etc\n"}
        ),
        Fs("swap", "swap", 16),
    ]


def _fstab(layout: list[Fs], uuids: dict[int, str]) -> str:
    lines = ["# /etc/fstab: static file system information."]
    for n, fs in enumerate(layout, start=1):
        if fs.mountpoint == "swap":
            lines.append(f"UUID={uuids[n]} none swap sw 0 0")
        else:
            passno = 1 if fs.mountpoint == "/" else 2
            lines.append(f"UUID={uuids[n]} {fs.mountpoint} ext4 defaults 0 {passno}")
    return "\n".join(lines) + "\n"


def _root_dirs(root: Path, mountpoints: list[str]) -> None:
    for d in ("proc", "sys", "dev", "run", "root", "usr/sbin", "usr/lib64", "etc/network"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for mp in mountpoints:
        if mp not in ("/", "swap"):
            (root / mp.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        (root / link).symlink_to(target)
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "usr/bin/ls").chmod(0o755)


def make_filesystems(
    layout: list[Fs], work: Path, image_id: int, fstab_extra: str = ""
) -> tuple[list[Path], dict[int, str]]:
    uuids = {n: tk.fs_uuid(image_id, n) for n in range(1, len(layout) + 1)}
    files: list[Path] = []
    for n, fs in enumerate(layout, start=1):
        out = work / f"p{n:02d}.img"
        if fs.mountpoint == "swap":
            tk.mkswap(out, fs.size_mib, fs.label, uuids[n])
        else:
            src = work / f"src{n:02d}"
            tree = dict(fs.files)
            if fs.mountpoint == "/":
                tree["/etc/fstab"] = _fstab(layout, uuids) + fstab_extra
            src.mkdir()
            tk.write_tree(src, tree, {})
            if fs.mountpoint == "/":
                _root_dirs(src, [f.mountpoint for f in layout])
            tk.mkfs_ext4(out, fs.size_mib, fs.label, uuids[n], src)
        files.append(out)
    return files, uuids


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    layout = _ten_layout()
    fs_files, uuids = make_filesystems(layout, work, TEN_ID)
    parts = [
        tk.Part(
            fs.size_mib,
            tk.GPT_LINUX_SWAP if fs.mountpoint == "swap" else tk.GPT_LINUX_FS,
            path,
            fs.label,
            tk.gpt_uuid(TEN_ID, n),
        )
        for n, (fs, path) in enumerate(zip(layout, fs_files, strict=True), start=1)
    ]
    size_mib = sum(fs.size_mib for fs in layout) + 2
    disk = out / "ten-parts-ubuntu.raw"
    tk.assemble(disk, size_mib, "gpt", tk.gpt_uuid(TEN_ID, 0), parts)
    notes = {
        "partition_count": len(layout),
        "mountpoints": {n: fs.mountpoint for n, fs in enumerate(layout, start=1)},
        "fs_uuids": uuids,
        "root_partition": 1,
        "virtual_size": size_mib * tk.MiB,
    }
    return disk.name, "raw", notes


def ten_parts_ubuntu_raw() -> BuiltImage:
    return tk.cached("ten-parts-ubuntu-raw", _build, sources=(__file__,))
