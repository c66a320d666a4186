"""The demo batch: realistic sample images, a few of them broken on purpose."""

from __future__ import annotations

import os

import yaml

from vmcraft_tasks.samples import imagebuild


def demo_manifest(directory: str) -> dict[str, object]:
    """Debian on GPT (VMDK) with /dev/sdX in fstab, Rocky on MBR logical partitions,
    Windows on NTFS, an ext4 with a dirty journal, a corrupt VMDK and a missing disk."""
    linux = imagebuild.linux_gpt_vmdk()
    rocky = imagebuild.mbr_logical_raw()
    windows = imagebuild.windows_ntfs_raw()
    dirty = imagebuild.dirty_ext4_raw()
    corrupt = imagebuild.corrupt_vmdk()
    return {
        "batch": "demo",
        "defaults": {"options": {"memory_mib": 2048, "vcpus": 2}},
        "vms": [
            {"id": "web01", "disks": [linux.path], "options": {"priority": 10}},
            {"id": "db02", "disks": [rocky.path], "options": {"priority": 5}},
            {"id": "win03", "disks": [windows.path]},
            {"id": "dirty04", "disks": [dirty.path], "options": {"dry_run": True}},
            {"id": "broken05", "disks": [corrupt.path]},
            {"id": "gone06", "disks": [os.path.join(directory, "missing", "gone06.vmdk")]},
        ],
    }


def write_demo_batch(directory: str) -> str:
    """Write the demo manifest into `directory` and return its path."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "demo.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(demo_manifest(directory), fh, sort_keys=False)
    return path
