"""A small Debian disk on MBR: /boot, / and swap, a kernel with virtio built in (the batch
benchmark's VMs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.recipes import linux_gpt, ten_parts_ubuntu
from vmcraft_tasks.samples.recipes.linux_gpt import DEBIAN_OS_RELEASE
from vmcraft_tasks.samples.recipes.ten_parts_ubuntu import (
    DPKG_STATUS,
    UBUNTU_KERNEL,
    Fs,
    make_filesystems,
)
from vmcraft_tasks.samples.toolkit import BuiltImage

SMALL_ID = 0x0B11
SMALL_DISK_ID = "0x5eed0b11"
VIRTIO_BUILTIN = "".join(
    f"kernel/drivers/{path}.ko\n"
    for path in ("block/virtio_blk", "virtio/virtio_pci", "net/virtio_net")
)


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    root: dict[str, str | bytes] = {
        "/usr/lib/os-release": DEBIAN_OS_RELEASE,
        "/etc/hostname": "small\n",
        "/etc/debian_version": "12.5\n",
        "/var/lib/dpkg/status": DPKG_STATUS,
        "/usr/bin/ls": Path("/usr/bin/true").read_bytes(),
        # A kernel the migration's readiness check accepts: virtio built in.
        f"/usr/lib/modules/{UBUNTU_KERNEL}/modules.builtin": VIRTIO_BUILTIN,
    }
    layout = [
        Fs("/boot", "boot", 16, {f"/vmlinuz-{UBUNTU_KERNEL}": "dummy kernel\n"}),
        Fs("/", "rootfs", 40, root),
        Fs("swap", "swap", 8),
    ]
    fs_files, uuids = make_filesystems(layout, work, SMALL_ID)
    types = {"/boot": "83", "/": "83", "swap": "82"}
    parts = [
        tk.Part(fs.size_mib, types[fs.mountpoint], path, bootable=fs.mountpoint == "/boot")
        for fs, path in zip(layout, fs_files, strict=True)
    ]
    size_mib = sum(fs.size_mib for fs in layout) + 2
    disk = out / "small-mbr.raw"
    tk.assemble(disk, size_mib, "dos", SMALL_DISK_ID, parts)
    notes = {"partition_count": 3, "fs_uuids": uuids, "root_partition": 2}
    return disk.name, "raw", notes


def small_mbr_raw() -> BuiltImage:
    return tk.cached(
        "small-mbr-raw", _build, sources=(__file__, ten_parts_ubuntu.__file__, linux_gpt.__file__)
    )
