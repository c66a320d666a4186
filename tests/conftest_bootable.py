"""Session fixtures for the real bootable Debian guests (samples/bootable*.py).

Load with `pytest_plugins = ["tests.conftest_bootable"]`. The first run builds them
(debootstrap from deb.debian.org, about 2-3 minutes); later runs load the on-disk
cache in well under a second. The images are shared and read-only: boot them with
`snapshot=on` (vmcraft_tasks.craft.boot does) or copy them first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

from vmcraft_tasks.samples import bootable
from vmcraft_tasks.samples.bootable import BootableImage
from vmcraft_tasks.samples.bootable_lvm import LvmBootableImage, bootable_debian_lvm
from vmcraft_tasks.samples.bootable_uefi import UefiBootableImage, bootable_debian_uefi

T = TypeVar("T")


def _build(factory: Callable[[], T]) -> T:
    # Loop devices, mounts and debootstrap need root; without it that is an
    # environment limit, not a failure of the code under test.
    if os.geteuid() != 0:
        pytest.skip("building bootable guests needs root")
    return factory()


@pytest.fixture(scope="session")
def bootable_bios() -> BootableImage:
    """Debian 12 on BIOS/GPT with /dev/sdX in fstab; its initramfs has virtio_blk."""
    return _build(bootable.bootable_debian_bios)


@pytest.fixture(scope="session")
def bootable_bios_modules_list() -> BootableImage:
    """The same guest with a MODULES=list initramfs of VMware's disk drivers only."""
    return _build(bootable.bootable_debian_bios_modules_list)


@pytest.fixture(scope="session")
def bootable_lvm() -> LvmBootableImage:
    """Debian 12 on LVM over two disks (VG deb12-vg: root, swap_1, srv across both PVs)."""
    return _build(bootable_debian_lvm)


@pytest.fixture(scope="session")
def bootable_uefi() -> UefiBootableImage:
    """Debian 12 installed for UEFI: ESP (FAT32), /boot, root, swap by UUID; boot with OVMF."""
    return _build(bootable_debian_uefi)
