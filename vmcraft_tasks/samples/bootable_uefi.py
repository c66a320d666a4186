"""A real, bootable Debian 12 guest installed for UEFI, laid out as Debian's installer does.

GPT: an EFI system partition (FAT32, mounted at /boot/efi), /boot (ext4), root (ext4)
and swap; fstab names every filesystem by UUID, as a modern installer writes it. GRUB
is the guest's own grub-efi-amd64, installed by its grub-install with `--removable
--no-nvram`: the firmware finds it at the fallback path EFI/BOOT/BOOTX64.EFI, with no
boot entry in NVRAM (which a disk image cannot carry anyway). Secure Boot is off, so
there is no shim and no signed GRUB: the ESP holds GRUB's core image alone, with the
config that finds /boot by UUID built into it (notes.grub_load_cfg), not a grub.cfg
stub beside it as the signed image needs. The kernel is loaded with linuxefi (see
_grub_cfg).

The kernel here has no vfat, so the ESP is never mounted with it: grub-install writes
into a fusefat mount of the ESP's loop device (grub-install insists that the EFI
directory is FAT), the ESP is then made afresh with mtools from what it wrote, and read
back and checked.

Built with bootable.py's pieces (chroot, unpack, initramfs, VMDK export, cache publish).
Two cache levels under `$VMCRAFT_SAMPLES_DIR`, apart from bootable.py's, whose keys this
module leaves alone:

- `bootable-uefi-rootfs-<key>/rootfs.tar.zst`: debootstrap of bootable.PACKAGES with
  grub-efi-amd64 in place of grub-pc;
- `bootable-uefi-<key>/debian12-uefi/disk.vmdk`: the disk.

Run `python -m vmcraft_tasks.samples.bootable_uefi` to warm the cache and print timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.samples import bootable, toolkit
from vmcraft_tasks.samples.bootable import (
    BOOT_MIB,
    DEBOOTSTRAP_TIMEOUT_S,
    DEBOOTSTRAP_VARIANT,
    DISK_MIB,
    GPT_HEAD_MIB,
    GPT_TAIL_MIB,
    MIRROR,
    MKFS_TIMEOUT_S,
    MOUNT_TIMEOUT_S,
    ROOT_PASSWORD,
    ROOTFS_TARBALL,
    SERIAL_CMDLINE,
    SUITE,
    SWAP_MIB,
    BootableBuildError,
    BootableNotes,
    Partition,
)
from vmcraft_tasks.samples.toolkit import (
    GPT_ESP,
    GPT_LINUX_FS,
    GPT_LINUX_SWAP,
    MANIFEST,
    BuiltImage,
    ImageBuildError,
    MiB,
    Part,
)

# grub-efi-amd64-bin holds the x86_64-efi modules grub-install builds the image from;
# grub-efi-amd64 (which depends on it) makes it the guest's boot loader package.
PACKAGES = (
    *(name for name in bootable.PACKAGES if name != "grub-pc"),
    "grub-efi-amd64",
    "grub-efi-amd64-bin",
)
VARIANT = bootable._Variant("debian12-uefi", 4, "most", (), expect_virtio_blk=True)

HOSTNAME = "deb12-uefi"
# Debian's installer makes the ESP FAT32; 100 MiB holds GRUB many times over.
ESP_MIB = 100
ESP_FAT = 32
ESP_PART, BOOT_PART, ROOT_PART, SWAP_PART = 1, 2, 3, 4
ROOT_MIB = DISK_MIB - GPT_HEAD_MIB - ESP_MIB - BOOT_MIB - SWAP_MIB - GPT_TAIL_MIB
ESP_MOUNTPOINT = "/boot/efi"
# Where the firmware looks when no boot entry names a loader (--removable).
EFI_LOADER = "/EFI/BOOT/BOOTX64.EFI"

FUSE_MOUNT_TIMEOUT_S = 15.0
FUSE_EXIT_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- rootfs


def _debootstrap(target: Path, debs: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    commands.run(
        [
            "debootstrap",
            f"--variant={DEBOOTSTRAP_VARIANT}",
            f"--include={','.join(PACKAGES)}",
            f"--cache-dir={debs}",
            SUITE,
            str(target),
            MIRROR,
        ],
        timeout=DEBOOTSTRAP_TIMEOUT_S,
    )


def _build_rootfs(out: Path) -> None:
    target = out / "root"
    try:
        # bootable.py's deb cache: only GRUB's EFI packages are new downloads.
        _debootstrap(target, bootable._cache_root() / "bootable-debs")
        for needed in ("usr/sbin/grub-install", "usr/lib/grub/x86_64-efi/kernel.img"):
            if not (target / needed).exists():
                raise BootableBuildError(f"debootstrap of {PACKAGES} left no /{needed}")
        if (target / "usr/lib/grub/i386-pc").exists():
            raise BootableBuildError("the UEFI rootfs has grub-pc's i386-pc modules")
        bootable._trim_rootfs(target)
        kernel = bootable._kernel_version(target / "boot")
        bootable._pack_rootfs(target, out / ROOTFS_TARBALL)
    finally:
        bootable._remove_if_unmounted(target)
    (out / MANIFEST).write_text(json.dumps({"kernel_version": kernel, "packages": PACKAGES}))


def rootfs_key() -> str:
    makers = (
        _build_rootfs,
        _debootstrap,
        bootable._trim_rootfs,
        bootable._kernel_version,
        bootable._pack_rootfs,
    )
    recipe = [SUITE, MIRROR, DEBOOTSTRAP_VARIANT, ",".join(PACKAGES)]
    return bootable._digest(*recipe, *(inspect.getsource(fn) for fn in makers))


def rootfs_tarball() -> tuple[Path, str]:
    """The cached debootstrap tarball with GRUB for EFI, and its kernel version; built once."""
    final = bootable._cache_root() / f"bootable-uefi-rootfs-{rootfs_key()}"
    if not (final / MANIFEST).exists():
        bootable._publish(final, _build_rootfs)
    manifest = json.loads((final / MANIFEST).read_text())
    return final / ROOTFS_TARBALL, str(manifest["kernel_version"])


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class UefiBootableNotes(BootableNotes):
    """BootableNotes of the UEFI guest (partitions esp, boot, root, swap), and its ESP."""

    firmware: str  # "uefi": boot it with OVMF (vmcraft_tasks.craft.boot.firmware)
    esp_mountpoint: str  # where fstab mounts the ESP
    efi_loader: str  # on the ESP: the firmware's fallback path, GRUB's core image
    esp_files: tuple[str, ...]  # every file on the ESP, as /EFI/BOOT/BOOTX64.EFI
    grub_load_cfg: str  # the config grub-install built into the loader: finds /boot

    @property
    def esp_uuid(self) -> str:
        """The FAT volume id as blkid and fstab spell it (B007-0401)."""
        return bootable._required(self.partition("esp").fs_uuid)


@dataclass(frozen=True)
class UefiBootableImage:
    path: str
    fmt: str
    notes: UefiBootableNotes

    def as_built_image(self) -> BuiltImage:
        """The same image in the toolkit's shape, for code that takes a BuiltImage."""
        return BuiltImage(self.path, self.fmt, dataclasses.asdict(self.notes))


# --------------------------------------------------------------------------- disk


# A FAT volume id is 32 bits; blkid and an installer's fstab write it XXXX-XXXX.
ESP_VOLUME_ID = f"b007{VARIANT.number:02x}{ESP_PART:02x}"
ESP_UUID = f"{ESP_VOLUME_ID[:4]}-{ESP_VOLUME_ID[4:]}".upper()


def _fs_uuid(number: int) -> str:
    if number == ESP_PART:
        return ESP_UUID
    return bootable._uuid(VARIANT, 9, number)


def _partition_disk(disk: Path) -> tuple[Partition, ...]:
    layout = [
        (ESP_PART, "esp", ESP_MIB, GPT_ESP, "vfat"),
        (BOOT_PART, "boot", BOOT_MIB, GPT_LINUX_FS, "ext4"),
        (ROOT_PART, "root", ROOT_MIB, GPT_LINUX_FS, "ext4"),
        (SWAP_PART, "swap", SWAP_MIB, GPT_LINUX_SWAP, "swap"),
    ]
    parts = [
        Part(size_mib, type_guid, name=role, partuuid=bootable._uuid(VARIANT, 8, number))
        for number, role, size_mib, type_guid, _ in layout
    ]
    made = toolkit.assemble(disk, DISK_MIB, "gpt", bootable._uuid(VARIANT, 8, 0), parts)
    return tuple(
        Partition(
            number=number,
            role=role,
            start=made[number]["start"],
            size=made[number]["size"],
            type_guid=type_guid,
            partuuid=bootable._uuid(VARIANT, 8, number),
            fs_type=fs_type,
            fs_uuid=_fs_uuid(number),
        )
        for number, role, _, type_guid, fs_type in layout
    )


def _mkfs(part: Partition, device: str) -> None:
    # No labels: the installer sets none.
    if part.fs_type == "vfat":
        # Hidden sectors: the partition's start, which a FAT boot sector records and
        # mkfs.vfat cannot learn from a loop device.
        argv = ["mkfs.vfat", "-F", str(ESP_FAT), "-i", ESP_VOLUME_ID]
        argv += ["-h", str(part.start // toolkit.SECTOR), device]
    elif part.fs_type == "swap":
        argv = ["mkswap", "-U", _fs_uuid(part.number), device]
    else:
        argv = ["mkfs.ext4", "-q", "-F", "-U", _fs_uuid(part.number), device]
    commands.run(argv, timeout=MKFS_TIMEOUT_S)


def _is_mountpoint(path: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(path) for line in fh)


@contextlib.contextmanager
def _fusefat(device: str, mnt: Path, work: Path) -> Iterator[Path]:
    """The FAT on `device` mounted read-write at `mnt` through fusefat, and gone after.

    fsname=<device> makes the device the mount's source, as for a kernel mount, so
    grub-install finds the device under its EFI directory and sees that it is FAT.
    -f keeps fusefat our child: its exit after the unmount is waited for, so no late
    write-back of its FAT lands on the device after the ESP is made afresh.
    """
    mnt.mkdir(parents=True, exist_ok=True)
    stderr = work / "fusefat.stderr"
    argv = ["fusefat", "-f", "-o", f"rw+,fsname={device}", device, str(mnt)]
    proc = commands.spawn_detached(argv, stderr_path=str(stderr))
    try:
        deadline = time.monotonic() + FUSE_MOUNT_TIMEOUT_S
        while not _is_mountpoint(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BootableBuildError(f"fusefat did not mount {device}: {_tail(stderr)}")
            time.sleep(0.05)
        try:
            yield mnt
        finally:
            commands.run(["umount", str(mnt)], timeout=MOUNT_TIMEOUT_S)
        proc.wait(timeout=FUSE_EXIT_TIMEOUT_S)
    finally:
        _reap(proc)
    if proc.returncode != 0:
        raise BootableBuildError(f"fusefat exited {proc.returncode}: {_tail(stderr)}")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=FUSE_EXIT_TIMEOUT_S)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-500:].strip()
    except OSError:
        return ""


def _mtools(argv: list[str]) -> str:
    # MTOOLS_SKIP_CHECK: mtools refuses a device whose geometry makes no sense to it,
    # as a loop device's does not.
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return commands.run(argv, timeout=MKFS_TIMEOUT_S, env=env).stdout


def _write_esp(part: Partition, device: str, tree: Path) -> None:
    """Make the ESP afresh and copy `tree` into it with mtools.

    Not left as fusefat wrote it: fusefat gives every file the 8.3 name ~N and
    garbles timestamps, where mtools (like the kernel) writes proper short names.
    """
    _mkfs(part, device)
    sources = [str(entry) for entry in sorted(tree.iterdir())]
    _mtools(["mcopy", "-s", "-m", "-i", device, *sources, "::/"])


def _files(tree: Path) -> dict[str, bytes]:
    return {
        "/" + str(path.relative_to(tree)): path.read_bytes()
        for path in sorted(tree.rglob("*"))
        if path.is_file()
    }


def _embedded_config(loader: bytes) -> str:
    """The config grub-mkimage put into a core image: a NUL-ended text, uncompressed on EFI."""
    at = loader.find(b"set prefix=")
    if at < 0:
        raise BootableBuildError(f"{EFI_LOADER} has no embedded config setting a prefix")
    start = loader.rfind(b"\0", 0, at) + 1
    return loader[start : loader.index(b"\0", at)].decode()


def _check_esp(device: str, tree: Path, work: Path) -> tuple[tuple[str, ...], str]:
    """Read the ESP back; returns its files and the loader's config.

    It must hold what grub-install wrote, the loader at the fallback path, and the
    loader must find /boot by its UUID and GRUB's files under it.
    """
    readback = work / "esp-readback"
    readback.mkdir()
    _mtools(["mcopy", "-s", "-n", "-i", device, "::/*", str(readback)])
    found, wrote = _files(readback), _files(tree)
    if found != wrote:
        raise BootableBuildError(f"ESP read back {sorted(found)}, written {sorted(wrote)}")
    if EFI_LOADER not in found:
        raise BootableBuildError(f"grub-install left no {EFI_LOADER} on the ESP: {sorted(found)}")
    config = _embedded_config(found[EFI_LOADER])
    wanted = (f"search.fs_uuid {_fs_uuid(BOOT_PART)} root", "set prefix=($root)'/grub'")
    missing = [line for line in wanted if line not in config]
    if missing:
        raise BootableBuildError(f"{EFI_LOADER}'s config lacks {missing}: {config!r}")
    return tuple(found), config


# --------------------------------------------------------------------------- guest


def _fstab() -> str:
    # What Debian 12's installer writes for a UEFI install with a separate /boot.
    return f"""\
# /etc/fstab: static file system information.
#
# Use 'blkid' to print the universally unique identifier for a
# device; this may be used with UUID= as a more robust way to name devices
# that works even if disks are added and removed. See fstab(5).
#
# systemd generates mount units based on this file, see systemd.mount(5).
# Please run 'systemctl daemon-reload' after making changes here.
#
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
# / was on /dev/sda{ROOT_PART} during installation
UUID={_fs_uuid(ROOT_PART)} /               ext4    errors=remount-ro 0       1
# /boot was on /dev/sda{BOOT_PART} during installation
UUID={_fs_uuid(BOOT_PART)} /boot           ext4    defaults        0       2
# /boot/efi was on /dev/sda{ESP_PART} during installation
UUID={ESP_UUID}  {ESP_MOUNTPOINT}       vfat    umask=0077      0       1
# swap was on /dev/sda{SWAP_PART} during installation
UUID={_fs_uuid(SWAP_PART)} none            swap    sw              0       0
"""


def _kernel_cmdline() -> str:
    return f"root=UUID={_fs_uuid(ROOT_PART)} ro {SERIAL_CMDLINE}"


def _grub_cfg(kernel: str) -> str:
    # bootable._grub_cfg with linuxefi/initrdefi in place of linux/initrd: the EFI
    # handover loader, which Debian's `linux` itself hands over to under Secure Boot.
    # With Secure Boot off, `linux` takes the legacy path, which first sets a video
    # mode and, with no GOP (a headless boot), prints "error: no suitable video mode
    # found": a GRUB error line the console judge counts against the boot.
    cfg = bootable._grub_cfg(kernel, _fs_uuid(BOOT_PART), _fs_uuid(ROOT_PART))
    for command in ("linux", "initrd"):
        cfg = cfg.replace(f"\n    {command} /", f"\n    {command}efi /")
    if "\n    linuxefi /" not in cfg or "\n    initrdefi /" not in cfg:
        raise BootableBuildError(f"grub.cfg has no linux and initrd lines to change: {cfg}")
    return cfg


def _configure_guest(root: Path) -> None:
    bootable._write(root, "/etc/fstab", _fstab())
    bootable._write(root, "/etc/hostname", HOSTNAME + "\n")
    bootable._write(root, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    bootable._write(root, "/etc/machine-id", f"b007{VARIANT.number:028x}\n")
    bootable._write(root, "/etc/default/grub", bootable._etc_default_grub())
    # As bootable.py: no resume device to wait for on every boot.
    bootable._write(root, "/etc/initramfs-tools/conf.d/resume", "RESUME=none\n")
    bootable._set_initramfs_modules(root, VARIANT)
    bootable._in_guest(root, ["chpasswd"], input_text=f"root:{ROOT_PASSWORD}\n")


def _grub_install(root: Path, esp_device: str, work: Path) -> Path:
    """GRUB for EFI by the guest's grub-install into the ESP; returns a copy of what it wrote.

    /boot is on a loop device of its own, not a partition of a disk, so
    grub-install cannot guess the partition map: the modules are named, as in
    bootable._install_grub. The ESP is reached through fusefat (see _fusefat).
    """
    argv = ["grub-install", "--target=x86_64-efi", f"--efi-directory={ESP_MOUNTPOINT}"]
    argv += ["--boot-directory=/boot", "--removable", "--no-nvram"]
    argv += ["--modules=part_gpt ext2 search_fs_uuid"]
    tree = work / "esp-tree"
    with _fusefat(esp_device, root / ESP_MOUNTPOINT.lstrip("/"), work) as mnt:
        bootable._in_guest(root, argv)
        shutil.copytree(mnt, tree)
    return tree


@dataclass(frozen=True)
class _Installed:
    partitions: tuple[Partition, ...]
    kernel: str
    has_virtio_blk: bool
    esp_files: tuple[str, ...]
    grub_load_cfg: str


def _install_guest(disk: Path, work: Path) -> _Installed:
    tarball, kernel = rootfs_tarball()
    parts = _partition_disk(disk)
    with contextlib.ExitStack() as stack:
        devices = {p.role: stack.enter_context(bootable._loop(disk, p)) for p in parts}
        for part in parts:
            _mkfs(part, devices[part.role])
        root = stack.enter_context(bootable._mounted(devices["root"], work / "mnt"))
        stack.enter_context(bootable._mounted(devices["boot"], root / "boot"))
        bootable._unpack_rootfs(tarball, root)
        (root / ESP_MOUNTPOINT.lstrip("/")).mkdir(mode=0o755, exist_ok=True)  # on /boot
        _configure_guest(root)
        modules = bootable._rebuild_initramfs(root, kernel)
        bootable._check_initramfs(VARIANT, modules)
        tree = _grub_install(root, devices["esp"], work)
        bootable._write(root, "/boot/grub/grub.cfg", _grub_cfg(kernel))
        esp = next(p for p in parts if p.role == "esp")
        _write_esp(esp, devices["esp"], tree)
        esp_files, load_cfg = _check_esp(devices["esp"], tree, work)
        bootable._trim(root / "boot", root)
    return _Installed(parts, kernel, "virtio_blk" in modules, esp_files, load_cfg)


# --------------------------------------------------------------------------- build


def disks_key() -> str:
    # bootable.disks_key covers bootable.py and the toolkit's partitioning.
    return bootable._digest(rootfs_key(), bootable.disks_key(), Path(__file__).read_text())


def _build(out: Path) -> None:
    work = out / "work"
    work.mkdir()
    disk = work / "disk.raw"
    installed = _install_guest(disk, work)
    bootable._export_vmdk(disk, out / "disk.vmdk")
    if toolkit.is_mounted_under(work):
        raise BootableBuildError(f"{work} still has mounts after the build")
    shutil.rmtree(work)
    kernel = installed.kernel
    notes = UefiBootableNotes(
        variant=VARIANT.name,
        kernel_version=kernel,
        hostname=HOSTNAME,
        root_password=ROOT_PASSWORD,
        fstab=_fstab(),
        kernel_cmdline=_kernel_cmdline(),
        initramfs_path=f"/boot/initrd.img-{kernel}",
        initramfs_modules=VARIANT.modules,
        initramfs_module_list=VARIANT.module_list,
        initramfs_has_virtio_blk=installed.has_virtio_blk,
        disk_guid=bootable._uuid(VARIANT, 8, 0),
        virtual_size=DISK_MIB * MiB,
        partitions=installed.partitions,
        firmware="uefi",
        esp_mountpoint=ESP_MOUNTPOINT,
        efi_loader=EFI_LOADER,
        esp_files=installed.esp_files,
        grub_load_cfg=installed.grub_load_cfg,
    )
    manifest = {"file": "disk.vmdk", "fmt": "vmdk", "notes": dataclasses.asdict(notes)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _load(final: Path) -> UefiBootableImage:
    manifest: dict[str, Any] = json.loads((final / MANIFEST).read_text())
    raw = dict(manifest["notes"])
    raw["partitions"] = tuple(Partition(**p) for p in raw["partitions"])
    for key in ("initramfs_module_list", "esp_files"):
        raw[key] = tuple(raw[key])
    notes = UefiBootableNotes(**raw)
    return UefiBootableImage(str(final / manifest["file"]), manifest["fmt"], notes)


def bootable_debian_uefi() -> UefiBootableImage:
    """Debian 12 installed for UEFI: ESP, /boot, root, swap by UUID; GRUB at the fallback path."""
    final = bootable._cache_root() / f"bootable-uefi-{disks_key()}" / VARIANT.name
    if not (final / MANIFEST).exists():
        # The rootfs first, under its own lock, as bootable._bootable does.
        rootfs_tarball()
        bootable._publish(final, _build)
    return _load(final)


def main() -> None:
    print(f"cache: {bootable._cache_root()}  rootfs {rootfs_key()}  disks {disks_key()}")
    total = time.monotonic()
    tarball, kernel = rootfs_tarball()
    print(f"{'rootfs (debootstrap, grub-efi)':34s} {time.monotonic() - total:7.2f}s  {tarball}")
    started = time.monotonic()
    built = bootable_debian_uefi()
    print(f"{'bootable_debian_uefi':34s} {time.monotonic() - started:7.2f}s  {built.path}")
    print(f"kernel {kernel}  total {time.monotonic() - total:.2f}s")


if __name__ == "__main__":
    try:
        main()
    except (CommandError, ImageBuildError) as exc:
        sys.exit(f"build failed: {exc}")
