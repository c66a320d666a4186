"""A real installed guest made ready for KVM by the library alone: tree, fixes,
initramfs rebuilt in the sandbox, capabilities, verdict."""

from __future__ import annotations

import subprocess

import pytest

from vmcraft_tasks.craft.fixes.devicenames import device_name_uses
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.prepare import prepare_guest
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.bootable import BootableImage

pytestmark = pytest.mark.timeout(1200)


def _converted(image: BootableImage, tmp_path) -> str:
    target = str(tmp_path / "disk.qcow2")
    subprocess.run(
        ["qemu-img", "convert", "-f", image.fmt, "-O", "qcow2", image.path, target], check=True
    )
    return target


def _prepare(path: str, mode):
    with VMCraft(path, readonly=mode != "apply") as g:
        report = g.inspect()
        (root,) = report.roots
        notes = g.mount_guest_tree(root, report.mounts)
        assert notes == []
        tree = report.mounts[root.root_partition].mountpoint
        prep = prepare_guest(tree, root, report.filesystems, report.partitions, mode=mode)
        remaining = device_name_uses(GuestFS(tree))
        boot_files = sorted(GuestFS(tree).ls("/boot"))
    return root, prep, remaining, boot_files


@pytest.mark.parametrize("fixture", ["bootable_bios", "bootable_bios_modules_list"])
def test_a_vmware_era_debian_is_made_bootable_on_virtio(request, fixture, tmp_path):
    image: BootableImage = request.getfixturevalue(fixture)
    root, prep, remaining, boot_files = _prepare(_converted(image, tmp_path), "apply")
    assert (root.distro, root.major, root.hostname) == ("debian", 12, image.notes.hostname)
    assert prep.problem is None, prep.problem
    changed = {r.name for r in prep.fixes.applied if r.changed}
    assert {"fstab", "initramfs-tools-virtio"} <= changed
    assert remaining == []  # no /dev/sdX left where booting depends on it
    (kernel,) = prep.initramfs.kernels
    assert kernel.kernel == image.notes.kernel_version and kernel.verified
    assert kernel.virtio_blk_before is image.notes.initramfs_has_virtio_blk
    assert kernel.virtio_blk_after and "virtio_blk" in kernel.modules_after
    assert kernel.backup is None  # verified: the old image is not kept
    assert f"initrd.img-{image.notes.kernel_version}" in boot_files
    assert (prep.guestcaps.block_bus, prep.guestcaps.net_model) == ("virtio", "virtio")


def test_without_fixes_the_guest_keeps_its_names_and_gets_sata(bootable_bios, tmp_path):
    _root, prep, remaining, _ = _prepare(_converted(bootable_bios, tmp_path), "off")
    assert prep.problem is None
    assert prep.initramfs is None
    assert {u.name for u in remaining} >= {"/dev/sda2", "/dev/sda4"}
    assert prep.guestcaps.block_bus == "sata"
    assert any("/dev/sda2" in reason for reason in prep.guestcaps.reasons)


def test_a_dry_run_reports_what_would_be_rebuilt_and_writes_nothing(
    bootable_bios_modules_list, tmp_path
):
    path = _converted(bootable_bios_modules_list, tmp_path)
    before = subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout
    _root, prep, _remaining, _ = _prepare(path, "dry_run")
    after = subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout
    assert before == after
    assert prep.problem is None
    (kernel,) = prep.initramfs.kernels
    assert kernel.action == "would-rebuild" and kernel.virtio_blk_before is False
