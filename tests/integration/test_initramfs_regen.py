"""Real offline initramfs rebuilds on a real converted Debian 12 guest.

The guest is the shared bootable fixture (tests/conftest_bootable.py): Debian 12 with
linux-image-amd64 and initramfs-tools whose initramfs was built with MODULES=list
and VMware's disk drivers only, so it cannot find its root disk on virtio. Each
test converts its VMDK to a qcow2 of its own, attaches it like the pipeline does
(write mode, or read-only for a dry run), mounts / and /boot inside it, and runs
the guest's own mkinitramfs and lsinitramfs in the sandbox. The result is checked
independently with the host's zstd and cpio.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.fixes.initramfs import ensure_initramfs_modules
from vmcraft_tasks.craft.fixes.initramfs_regen import (
    BACKUP_SUFFIX,
    NEW_SUFFIX,
    InitramfsError,
    initramfs_modules,
    regenerate_initramfs,
)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.bootable import BootableImage
from vmcraft_tasks.samples.toolkit import sha256_file

# The first run may have to build the shared guest (debootstrap, a few minutes).
pytestmark = pytest.mark.timeout(1800)

CONVERT_TIMEOUT_S = 600.0
REGEN_TIMEOUT_S = 600.0
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
VMWARE_DRIVERS = {"mptspi", "vmw_pvscsi"}


@dataclass
class Guest:
    disk: VMCraft
    root: str
    kernel: str
    image: str  # host path of the live initramfs

    @property
    def fs(self) -> GuestFS:
        return GuestFS(self.root)


def host_listing(image: str) -> set[str]:
    """Module file names in an image, read by the HOST's zstd and cpio (independent check)."""
    with open(image, "rb") as fh:
        assert fh.read(4) == ZSTD_MAGIC, "Debian 12 images are one zstd-compressed cpio"
    script = 'zstd -dc -- "$1" | cpio -it --quiet'
    out = commands.run(["sh", "-c", script, "list", image], timeout=120).stdout
    return {line.rsplit("/", 1)[-1] for line in out.splitlines() if ".ko" in line}


@pytest.fixture
def converted(tmp_path: Path, bootable_bios_modules_list: BootableImage) -> str:
    """The pipeline's first step: the VMware disk converted to a qcow2 we own."""
    target = str(tmp_path / "converted.qcow2")
    argv = ["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2"]
    commands.run([*argv, bootable_bios_modules_list.path, target], timeout=CONVERT_TIMEOUT_S)
    return target


def _attach(path: str, notes: BootableImage, open_disk: list[VMCraft], *, readonly: bool) -> Guest:
    g = VMCraft(path, readonly=readonly).launch()
    open_disk.append(g)
    root = g.private_mountpoint("root")
    # / first, then /boot at its fstab place inside it: one tree that looks like /.
    g.mount(notes.notes.partition("root").number, root)
    g.mount(notes.notes.partition("boot").number, os.path.join(root, "boot"))
    kernel = notes.notes.kernel_version
    return Guest(g, root, kernel, os.path.join(root, "boot", f"initrd.img-{kernel}"))


@pytest.fixture
def guest(
    converted: str, bootable_bios_modules_list: BootableImage, open_disk: list[VMCraft]
) -> Iterator[Guest]:
    yield _attach(converted, bootable_bios_modules_list, open_disk, readonly=False)


def boot_and_config(guest: Guest) -> dict[str, str]:
    """Digest of every file under /boot and /etc/initramfs-tools (what a rebuild may touch)."""
    found = {}
    for top in ("boot", "etc/initramfs-tools"):
        for dirpath, _, files in os.walk(os.path.join(guest.root, top)):
            for name in files:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    found[os.path.relpath(path, guest.root)] = sha256_file(path)
    return found


def assert_no_leftovers(guest: Guest) -> None:
    left = [
        n
        for n in os.listdir(os.path.join(guest.root, "boot"))
        if n.endswith((BACKUP_SUFFIX, NEW_SUFFIX))
    ]
    assert left == []


def add_hook(guest: Guest, name: str, body: str) -> None:
    path = Path(guest.root, "etc/initramfs-tools/hooks", name)
    path.write_text('#!/bin/sh\ncase "$1" in prereqs) echo ""; exit 0;; esac\n' + body)
    path.chmod(0o755)


def test_converted_guest_gets_virtio_blk_in_its_initramfs(
    guest: Guest,
    converted: str,
    bootable_bios_modules_list: BootableImage,
    open_disk: list[VMCraft],
) -> None:
    before = initramfs_modules(guest.root, guest.kernel)
    assert "virtio_blk" not in before and before >= VMWARE_DRIVERS
    modules_file = guest.fs.cat("/etc/initramfs-tools/modules")

    report = regenerate_initramfs(
        guest.root, arch="x86_64", dry_run=False, timeout_s=REGEN_TIMEOUT_S
    )

    assert report.outcome == "rebuilt" and report.modules_policy == "list"
    (result,) = report.kernels
    print(
        f"\nregenerated {result.kernel} in {result.seconds:.1f} s: "
        f"{len(result.modules_before)} -> {len(result.modules_after or ())} modules"
    )
    assert result.action == "rebuilt" and result.verified and result.backup is None
    assert (result.virtio_blk_before, result.virtio_blk_after) == (False, True)
    after = result.modules_after or frozenset()
    assert {"virtio_blk", "virtio_pci", "virtio_scsi"} | VMWARE_DRIVERS <= after
    # MODULES=list without virtio: added in a temporary config, the guest's left alone.
    assert any("MODULES=list" in note for note in report.notes)
    assert guest.fs.cat("/etc/initramfs-tools/modules") == modules_file
    assert_no_leftovers(guest)
    # Independently of the guest's tools: the host's zstd + cpio see virtio_blk.ko.
    assert "virtio_blk.ko" in host_listing(guest.image)
    assert initramfs_modules(guest.root, guest.kernel) == after

    # On disk for good: a read-only attach (noexec mounts) lists the same image.
    guest.disk.shutdown()
    again = _attach(converted, bootable_bios_modules_list, open_disk, readonly=True)
    assert initramfs_modules(again.root, again.kernel) == after


def test_after_the_virtio_config_fix_the_guest_config_alone_is_used(guest: Guest) -> None:
    # What the pipeline's virtio-initramfs fix writes before the rebuild.
    text = guest.fs.cat("/etc/initramfs-tools/modules")
    fixed, changes = ensure_initramfs_modules(text)
    assert changes
    guest.fs.write_file("/etc/initramfs-tools/modules", fixed.encode())

    report = regenerate_initramfs(guest.root, arch="x86_64", dry_run=False)

    (result,) = report.kernels
    assert result.action == "rebuilt" and result.verified
    assert report.notes == ()  # no temporary config needed
    assert {"virtio_blk", "virtio_net", "virtio_pci", "virtio_scsi"} <= (
        result.modules_after or frozenset()
    )
    assert "virtio_net.ko" in host_listing(guest.image)


def test_dry_run_reports_and_writes_nothing(guest: Guest) -> None:
    before = boot_and_config(guest)
    report = regenerate_initramfs(guest.root, arch="x86_64", dry_run=True)
    assert report.outcome == "dry-run" and report.dry_run
    (result,) = report.kernels
    assert result.action == "would-rebuild" and result.generator == "initramfs-tools"
    assert result.virtio_blk_before is False and result.modules_before >= VMWARE_DRIVERS
    assert result.modules_after is None
    assert boot_and_config(guest) == before


def test_dry_run_on_a_read_only_attach(
    converted: str, bootable_bios_modules_list: BootableImage, open_disk: list[VMCraft]
) -> None:
    """A dry run attaches read-only: noexec mounts on a throw-away overlay."""
    digest = sha256_file(converted)
    guest = _attach(converted, bootable_bios_modules_list, open_disk, readonly=True)
    report = regenerate_initramfs(guest.root, arch=None, dry_run=True)
    (result,) = report.kernels
    assert report.arch == "x86_64"  # read from the guest's own binaries
    assert result.action == "would-rebuild" and result.modules_before >= VMWARE_DRIVERS
    guest.disk.shutdown()
    assert sha256_file(converted) == digest


def test_failing_generator_keeps_the_old_image(guest: Guest) -> None:
    add_hook(guest, "zz-vmcraft-test-fails", 'echo "E: the test hook refuses" >&2\nexit 1\n')
    digest = sha256_file(guest.image)
    with pytest.raises(InitramfsError) as caught:
        regenerate_initramfs(guest.root, arch="x86_64", dry_run=False)
    error = caught.value
    assert error.kernel == guest.kernel and "initramfs-tools failed" in error.reason
    assert "the test hook refuses" in error.output_tail
    assert error.report is not None and error.report.kernels[0].action == "failed"
    assert sha256_file(guest.image) == digest
    assert_no_leftovers(guest)


def test_image_without_virtio_blk_is_not_installed(guest: Guest) -> None:
    add_hook(
        guest,
        "zz-vmcraft-test-drops-virtio",
        "find \"$DESTDIR\" -name 'virtio_blk.ko*' -delete\n",
    )
    digest = sha256_file(guest.image)
    with pytest.raises(InitramfsError, match="lacks virtio_blk"):
        regenerate_initramfs(guest.root, arch="x86_64", dry_run=False)
    assert sha256_file(guest.image) == digest
    assert_no_leftovers(guest)


def test_modules_dep_guest_is_rebuilt_with_most(guest: Guest) -> None:
    conf = Path(guest.root, "etc/initramfs-tools/initramfs.conf")
    conf.write_text(conf.read_text().replace("MODULES=list", "MODULES=dep"))

    report = regenerate_initramfs(guest.root, arch="x86_64", dry_run=False)

    assert report.modules_policy == "dep"
    assert any("MODULES=dep" in note for note in report.notes)
    (result,) = report.kernels
    print(
        f"\nMODULES=dep -> most: {result.kernel} in {result.seconds:.1f} s: "
        f"{len(result.modules_before)} -> {len(result.modules_after or ())} modules"
    )
    assert result.verified and "virtio_blk" in (result.modules_after or ())
    # MODULES=most carries every disk driver, far more than the dep/list image had.
    assert len(result.modules_after or ()) > 10 * len(result.modules_before)
    assert "MODULES=dep" in conf.read_text()
