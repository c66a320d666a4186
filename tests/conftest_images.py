"""Session fixtures for the cached sample images (vmcraft_tasks/samples/recipes/).

Load with `pytest_plugins = ["tests.conftest_images"]`. Each fixture builds its
image on first use (or reuses the on-disk cache) and returns a BuiltImage; the
deliberately bad inputs return a plain path. Images are shared and read-only by
convention: a test that writes must work on `image_copy(...)` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmcraft_tasks.samples import SAMPLES, toolkit
from vmcraft_tasks.samples.toolkit import BuiltImage


def _build(factory: Callable[[], BuiltImage]) -> BuiltImage:
    # Building needs loop devices, mounts and FUSE; without root that is an
    # environment limit, not a failure of the code under test.
    if os.geteuid() != 0:
        pytest.skip("building test images needs root")
    return factory()


@pytest.fixture(scope="session")
def linux_gpt_raw() -> BuiltImage:
    return _build(SAMPLES["linux_gpt_raw"])


@pytest.fixture(scope="session")
def linux_gpt_qcow2() -> BuiltImage:
    return _build(SAMPLES["linux_gpt_qcow2"])


@pytest.fixture(scope="session")
def linux_gpt_vmdk() -> BuiltImage:
    return _build(SAMPLES["linux_gpt_vmdk"])


@pytest.fixture(scope="session")
def linux_gpt_vhdx() -> BuiltImage:
    return _build(SAMPLES["linux_gpt_vhdx"])


@pytest.fixture(scope="session")
def linux_gpt_vpc() -> BuiltImage:
    return _build(SAMPLES["linux_gpt_vpc"])


@pytest.fixture(scope="session")
def mbr_logical_raw() -> BuiltImage:
    return _build(SAMPLES["mbr_logical_raw"])


@pytest.fixture(scope="session")
def dirty_ext4_raw() -> BuiltImage:
    return _build(SAMPLES["dirty_ext4_raw"])


@pytest.fixture(scope="session")
def broken_journal_ext4_raw() -> BuiltImage:
    return _build(SAMPLES["broken_journal_ext4_raw"])


@pytest.fixture(scope="session")
def dirty_xfs_raw() -> BuiltImage:
    return _build(SAMPLES["dirty_xfs_raw"])


@pytest.fixture(scope="session")
def broken_log_xfs_raw() -> BuiltImage:
    return _build(SAMPLES["broken_log_xfs_raw"])


@pytest.fixture(scope="session")
def windows_ntfs_raw() -> BuiltImage:
    return _build(SAMPLES["windows_ntfs_raw"])


@pytest.fixture(scope="session")
def twenty_parts_raw() -> BuiltImage:
    return _build(SAMPLES["twenty_parts_raw"])


@pytest.fixture(scope="session")
def corrupt_vmdk() -> str:
    return _build(SAMPLES["corrupt_vmdk"]).path


@pytest.fixture(scope="session")
def text_vmdk() -> str:
    return _build(SAMPLES["text_vmdk"]).path


@pytest.fixture(scope="session")
def missing_extent_vmdk() -> str:
    return _build(SAMPLES["missing_extent_vmdk"]).path


@pytest.fixture(scope="session")
def not_an_image() -> str:
    return _build(SAMPLES["not_an_image"]).path


@pytest.fixture
def image_copy(tmp_path: Path) -> Callable[[BuiltImage | str], str]:
    """Return a function that copies an image into this test's tmp dir, for tests that write."""

    def copy(built: BuiltImage | str) -> str:
        return toolkit.copy_image(built, tmp_path / "images")

    return copy


# Real installer layouts with a partition blkid cannot name (tests of the scan).


@pytest.fixture(scope="session")
def gpt_bios_boot_raw() -> BuiltImage:
    return _build(SAMPLES["gpt_bios_boot_raw"])


@pytest.fixture(scope="session")
def gpt_windows_raw() -> BuiltImage:
    return _build(SAMPLES["gpt_windows_raw"])


@pytest.fixture(scope="session")
def mbr_empty_between_raw() -> BuiltImage:
    return _build(SAMPLES["mbr_empty_between_raw"])


@pytest.fixture(scope="session")
def random_first_raw() -> BuiltImage:
    return _build(SAMPLES["random_first_raw"])
