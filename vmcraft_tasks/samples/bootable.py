"""Build real, bootable Debian 12 guests (GRUB on BIOS/GPT) once, and cache them on disk.

The guests are made the way an installer makes them: debootstrap a root, partition a
disk, mkfs, unpack, install GRUB with the guest's own grub-install, then export as a
monolithicSparse VMDK, as it would arrive from VMware. Two variants carry the two
classic migration problems: `/dev/sdX` names in fstab, and an initramfs without
virtio_blk.

Two cache levels under `$VMCRAFT_SAMPLES_DIR` (default /var/tmp/vmcraft-samples):

- `bootable-rootfs-<key>/rootfs.tar.zst`: the debootstrap result. The key hashes the
  suite, mirror, package list and the source of the functions that make the tarball,
  so editing the disk-assembly code below does not cost a new debootstrap (minutes).
- `bootable-<key>/<variant>/disk.vmdk`: the disks. The key hashes the rootfs key,
  this whole module and the toolkit functions that partition the disk.

Every build holds a flock and lands atomically (temp dir, then rename), as the
toolkit's cache does. Mounts, loop devices and the chroot are undone in `finally` blocks.

Run `python -m vmcraft_tasks.samples.bootable` to warm the cache and print timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.atomicfile import locked
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.samples import toolkit
from vmcraft_tasks.samples.toolkit import (
    GPT_BIOS_BOOT,
    GPT_LINUX_FS,
    GPT_LINUX_SWAP,
    MANIFEST,
    BuiltImage,
    ImageBuildError,
    MiB,
    Part,
)

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_VARIANT = "minbase"
# udev: without it systemd never sees a .device unit and the initramfs cannot resolve
# root=UUID=; dbus: systemd-logind fails without a system bus, which would put a
# [FAILED] line into every boot; busybox: the initramfs shell real installs drop into.
PACKAGES = (
    "linux-image-amd64",
    "systemd-sysv",
    "grub-pc",
    "initramfs-tools",
    "udev",
    "dbus",
    "busybox",
    "zstd",
)

DISK_MIB = 2048
BIOS_BOOT_MIB = 1
BOOT_MIB = 256
SWAP_MIB = 64
# The GPT header before the first partition and its backup after the last.
GPT_HEAD_MIB = 1
GPT_TAIL_MIB = 1
ROOT_MIB = DISK_MIB - GPT_HEAD_MIB - BIOS_BOOT_MIB - BOOT_MIB - SWAP_MIB - GPT_TAIL_MIB

BIOS_BOOT_PART, BOOT_PART, ROOT_PART, SWAP_PART = 1, 2, 3, 4
HOSTNAME = "deb12-bios"
ROOT_PASSWORD = "vmcraft"
SERIAL_CMDLINE = "console=tty0 console=ttyS0,115200n8"
# What an old VMware install leaves behind: every filesystem by its SCSI disk name.
FSTAB = """\
# /etc/fstab: static file system information.
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
/dev/sda3       /               ext4    errors=remount-ro 0       1
/dev/sda2       /boot           ext4    defaults        0       2
/dev/sda4       none            swap    sw              0       0
"""
# VMware's disk controllers only: a guest installed there never needed virtio. ext4
# because MODULES=list adds no filesystem module by itself: without it this guest
# could not mount its root on VMware either ("mount: mounting /dev/sda3 on /root
# failed: No such device"), and would not be a source that worked before migration.
VMWARE_MODULES = ("ahci", "ata_piix", "sd_mod", "mptspi", "vmw_pvscsi", "ext4")

DEBOOTSTRAP_TIMEOUT_S = 3600.0
TAR_TIMEOUT_S = 900.0
CHROOT_TIMEOUT_S = 900.0
MOUNT_TIMEOUT_S = 60.0
MKFS_TIMEOUT_S = 120.0
CONVERT_TIMEOUT_S = 900.0

ROOTFS_TARBALL = "rootfs.tar.zst"
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class BootableBuildError(ImageBuildError):
    """A bootable guest could not be built, or came out different from what it promises."""


@dataclass(frozen=True)
class Partition:
    number: int
    role: str  # bios_boot | boot | root | swap
    start: int  # bytes
    size: int  # bytes
    type_guid: str
    partuuid: str
    fs_type: str | None
    fs_uuid: str | None


@dataclass(frozen=True)
class BootableNotes:
    variant: str
    kernel_version: str
    hostname: str
    root_password: str
    fstab: str
    kernel_cmdline: str
    initramfs_path: str  # inside the guest, on /boot
    initramfs_modules: str  # initramfs-tools MODULES= setting: most | list
    initramfs_module_list: tuple[str, ...]  # /etc/initramfs-tools/modules (MODULES=list)
    initramfs_has_virtio_blk: bool
    disk_guid: str
    virtual_size: int
    partitions: tuple[Partition, ...]

    def partition(self, role: str) -> Partition:
        for part in self.partitions:
            if part.role == role:
                return part
        raise KeyError(f"no {role} partition in {self.variant}")

    @property
    def fs_uuids(self) -> dict[int, str]:
        return {p.number: p.fs_uuid for p in self.partitions if p.fs_uuid}

    @property
    def boot_uuid(self) -> str:
        return _required(self.partition("boot").fs_uuid)

    @property
    def root_uuid(self) -> str:
        return _required(self.partition("root").fs_uuid)

    @property
    def swap_uuid(self) -> str:
        return _required(self.partition("swap").fs_uuid)


@dataclass(frozen=True)
class BootableImage:
    path: str
    fmt: str
    notes: BootableNotes

    def as_built_image(self) -> BuiltImage:
        """The same image in the toolkit's shape, for code that takes a BuiltImage."""
        return BuiltImage(self.path, self.fmt, dataclasses.asdict(self.notes))


@dataclass(frozen=True)
class _Variant:
    name: str
    number: int  # makes this variant's UUIDs its own
    modules: str  # initramfs-tools MODULES=
    module_list: tuple[str, ...]
    expect_virtio_blk: bool


BIOS = _Variant("debian12-bios", 1, "most", (), expect_virtio_blk=True)
BIOS_MODULES_LIST = _Variant(
    "debian12-bios-modules-list", 2, "list", VMWARE_MODULES, expect_virtio_blk=False
)


def _required(value: str | None) -> str:
    if value is None:
        raise BootableBuildError("partition has no filesystem UUID")
    return value


# --------------------------------------------------------------------------- cache


def _cache_root() -> Path:
    return toolkit.cache_root()


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        # Length-prefixed, so text moving between two parts still changes the hash.
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:12]


def rootfs_key() -> str:
    recipe = [SUITE, MIRROR, DEBOOTSTRAP_VARIANT, ",".join(PACKAGES)]
    makers = (_build_rootfs, _debootstrap, _trim_rootfs, _kernel_version, _pack_rootfs)
    recipe += [inspect.getsource(fn) for fn in makers]
    return _digest(*recipe)


def disks_key() -> str:
    # This module, and the toolkit functions that lay out its partition table.
    layout = [inspect.getsource(fn) for fn in (toolkit.assemble, toolkit.sfdisk_script)]
    return _digest(rootfs_key(), Path(__file__).read_text(), *layout)


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    # Its own name: the rootfs is built in the cache root, which the toolkit shares.
    with locked(str(directory / ".bootable.lock"), mode=0o644):
        yield


def _remove_if_unmounted(path: Path) -> None:
    # rmtree through a leftover bind of /dev or /sys would delete the host's files.
    toolkit.remove_if_unmounted(path)


def _publish(final: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` and rename tmp to `final`, unless `final` already exists.

    Holds the parent directory's lock, so concurrent test processes share one build;
    the rename means nobody ever sees a half-made result.
    """
    parent = final.parent
    with _lock(parent):
        if final.exists():
            return
        for stale in parent.glob(f".build-{final.name}-*"):
            _remove_if_unmounted(stale)  # under the lock: its builder died
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            _remove_if_unmounted(tmp)


# --------------------------------------------------------------------------- guest chroot


def _in_guest(root: Path, argv: list[str], *, input_text: str | None = None) -> str:
    """Run `argv` inside the guest tree at `root` with /dev, /proc and /sys available.

    bubblewrap instead of chroot + bind mounts: its mounts live in a private
    namespace that the kernel tears down when it exits, so no bind of the host's
    /dev can outlive a failed build. Its own pid namespace means a timed-out
    command takes its children with it.
    """
    bwrap = ["bwrap", "--bind", str(root), "/", "--dev-bind", "/dev", "/dev"]
    bwrap += ["--proc", "/proc", "--bind", "/sys", "/sys", "--unshare-pid"]
    bwrap += ["--die-with-parent", "--chdir", "/"]
    env = {"PATH": GUEST_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    result = commands.run([*bwrap, *argv], timeout=CHROOT_TIMEOUT_S, input_text=input_text, env=env)
    return result.stdout


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


def _trim_rootfs(target: Path) -> None:
    # The packages are kept in the shared deb cache; a second copy in every disk is waste.
    for deb in (target / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _pack_rootfs(target: Path, tarball: Path) -> None:
    commands.run(
        [
            "tar",
            "--create",
            "--file",
            str(tarball),
            "--use-compress-program=zstd -T0 -3",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "-C",
            str(target),
            ".",
        ],
        timeout=TAR_TIMEOUT_S,
    )


def _kernel_version(boot: Path) -> str:
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BootableBuildError(f"expected one kernel in {boot}, found {kernels}")
    return kernels[0]


def _build_rootfs(out: Path) -> None:
    target = out / "root"
    try:
        _debootstrap(target, _cache_root() / "bootable-debs")
        _trim_rootfs(target)
        kernel = _kernel_version(target / "boot")
        _pack_rootfs(target, out / ROOTFS_TARBALL)
    finally:
        _remove_if_unmounted(target)
    (out / MANIFEST).write_text(json.dumps({"kernel_version": kernel, "packages": PACKAGES}))


def rootfs_tarball() -> tuple[Path, str]:
    """The cached debootstrap tarball and the kernel version in it; built on first use."""
    final = _cache_root() / f"bootable-rootfs-{rootfs_key()}"
    if not (final / MANIFEST).exists():
        _publish(final, _build_rootfs)
    manifest = json.loads((final / MANIFEST).read_text())
    return final / ROOTFS_TARBALL, str(manifest["kernel_version"])


# --------------------------------------------------------------------------- disk


def _uuid(variant: _Variant, kind: int, n: int) -> str:
    # Fixed, readable UUIDs: tests and notes can name them; kind 8 = GPT, 9 = filesystem.
    return f"b007{variant.number:04x}-0000-4000-{kind}000-{n:012x}"


def _layout(variant: _Variant) -> list[tuple[int, str, int, str, str | None]]:
    """(number, role, size MiB, GPT type, filesystem) for each partition, in disk order."""
    return [
        (BIOS_BOOT_PART, "bios_boot", BIOS_BOOT_MIB, GPT_BIOS_BOOT, None),
        (BOOT_PART, "boot", BOOT_MIB, GPT_LINUX_FS, "ext4"),
        (ROOT_PART, "root", ROOT_MIB, GPT_LINUX_FS, "ext4"),
        (SWAP_PART, "swap", SWAP_MIB, GPT_LINUX_SWAP, "swap"),
    ]


def _partition_disk(disk: Path, variant: _Variant) -> tuple[Partition, ...]:
    layout = _layout(variant)
    parts = [
        Part(size_mib, type_guid, name=role, partuuid=_uuid(variant, 8, number))
        for number, role, size_mib, type_guid, _ in layout
    ]
    made = toolkit.assemble(disk, DISK_MIB, "gpt", _uuid(variant, 8, 0), parts)
    return tuple(
        Partition(
            number=number,
            role=role,
            start=made[number]["start"],
            size=made[number]["size"],
            type_guid=type_guid,
            partuuid=_uuid(variant, 8, number),
            fs_type=fs_type,
            fs_uuid=_uuid(variant, 9, number) if fs_type else None,
        )
        for number, role, _, type_guid, fs_type in layout
    )


def _loop(image: Path, part: Partition | None = None) -> contextlib.AbstractContextManager[str]:
    """A loop device over the whole image, or over one partition of it.

    The kernel here does not scan partition tables on loop devices, so each
    filesystem gets a loop device of its own at its partition's offset.
    """
    if part is None:
        return toolkit.loop(image)
    return toolkit.loop(image, offset=part.start, sizelimit=part.size)


def _mounted(device: str, mountpoint: Path) -> contextlib.AbstractContextManager[Path]:
    return toolkit.mounted(device, mountpoint, "ext4")


def _make_filesystem(part: Partition, device: str) -> None:
    uuid = _required(part.fs_uuid)
    if part.fs_type == "swap":
        argv = ["mkswap", "-L", part.role, "-U", uuid, device]
    else:
        argv = ["mkfs.ext4", "-q", "-F", "-L", part.role, "-U", uuid, device]
    commands.run(argv, timeout=MKFS_TIMEOUT_S)


def _unpack_rootfs(tarball: Path, root: Path) -> None:
    commands.run(
        [
            "tar",
            "--extract",
            "--file",
            str(tarball),
            "--use-compress-program=zstd",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "-C",
            str(root),
        ],
        timeout=TAR_TIMEOUT_S,
    )


# --------------------------------------------------------------------------- guest config


def _etc_default_grub() -> str:
    # Only read by update-grub, which this build never runs (without udev it would
    # write root=/dev/loopN); kept consistent so a later update-grub keeps the serial
    # console, as on a real install set up for it.
    return (
        "GRUB_DEFAULT=0\n"
        "GRUB_TIMEOUT=1\n"
        "GRUB_DISTRIBUTOR=Debian\n"
        'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
        f'GRUB_CMDLINE_LINUX="{SERIAL_CMDLINE}"\n'
        'GRUB_TERMINAL="console serial"\n'
        'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
    )


def _grub_cfg(kernel: str, boot_uuid: str, root_uuid: str) -> str:
    return f"""\
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set default=0
set timeout=1
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root {boot_uuid}
menuentry 'Debian GNU/Linux, with Linux {kernel}' {{
    insmod part_gpt
    insmod ext2
    search --no-floppy --fs-uuid --set=root {boot_uuid}
    echo 'Loading Linux {kernel} ...'
    linux /vmlinuz-{kernel} root=UUID={root_uuid} ro {SERIAL_CMDLINE}
    echo 'Loading initial ramdisk ...'
    initrd /initrd.img-{kernel}
}}
"""


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _configure_guest(root: Path, variant: _Variant) -> None:
    _write(root, "/etc/fstab", FSTAB)
    _write(root, "/etc/hostname", HOSTNAME + "\n")
    _write(root, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    # debootstrap's id would be shared by every variant; a present id also keeps
    # systemd-firstboot from prompting on the console.
    _write(root, "/etc/machine-id", f"b007{variant.number:028x}\n")
    _write(root, "/etc/default/grub", _etc_default_grub())
    # No resume device: the initramfs would otherwise wait for /dev/sda4 on every boot.
    _write(root, "/etc/initramfs-tools/conf.d/resume", "RESUME=none\n")
    _set_initramfs_modules(root, variant)
    _in_guest(root, ["chpasswd"], input_text=f"root:{ROOT_PASSWORD}\n")


def _set_initramfs_modules(root: Path, variant: _Variant) -> None:
    conf = root / "etc/initramfs-tools/initramfs.conf"
    lines = conf.read_text().splitlines()
    if not any(line.startswith("MODULES=") for line in lines):
        raise BootableBuildError(f"{conf} has no MODULES= line to change")
    lines = [f"MODULES={variant.modules}" if ln.startswith("MODULES=") else ln for ln in lines]
    conf.write_text("\n".join(lines) + "\n")
    if variant.module_list:
        modules = root / "etc/initramfs-tools/modules"
        header = "# The VMware host's disk controllers and the root filesystem.\n"
        modules.write_text(header + "".join(f"{name}\n" for name in variant.module_list))


def _rebuild_initramfs(root: Path, kernel: str) -> frozenset[str]:
    """Rebuild the guest's initramfs in the guest; returns the kernel modules it holds."""
    _in_guest(root, ["update-initramfs", "-u", "-k", kernel])
    listing = _in_guest(root, ["lsinitramfs", f"/boot/initrd.img-{kernel}"])
    names = (line.rsplit("/", 1)[-1] for line in listing.split())
    return frozenset(name.split(".ko")[0] for name in names if ".ko" in name)


def _check_initramfs(variant: _Variant, modules: frozenset[str]) -> None:
    # The whole point of each variant; a changed initramfs-tools default must not
    # silently turn the "no virtio" guest into one that boots.
    has_virtio_blk = "virtio_blk" in modules
    if has_virtio_blk != variant.expect_virtio_blk:
        raise BootableBuildError(
            f"{variant.name}: initramfs has virtio_blk={has_virtio_blk}, "
            f"wanted {variant.expect_virtio_blk} (MODULES={variant.modules})"
        )
    missing = sorted(set(variant.module_list) - modules)
    if missing:
        raise BootableBuildError(f"{variant.name}: initramfs lacks listed modules {missing}")


def _install_grub(root: Path, disk_device: str, kernel: str, parts: tuple[Partition, ...]) -> None:
    """Embed GRUB into the BIOS boot partition with the guest's own grub-install.

    grub-install sees /boot on a loop device of its own, not as a partition of the
    disk, so it cannot guess the partition map and filesystem modules: name them.
    """
    by_role = {p.role: p for p in parts}
    _in_guest(
        root,
        [
            "grub-install",
            "--target=i386-pc",
            "--boot-directory=/boot",
            "--modules=part_gpt ext2 search_fs_uuid biosdisk",
            disk_device,
        ],
    )
    cfg = _grub_cfg(kernel, _required(by_role["boot"].fs_uuid), _required(by_role["root"].fs_uuid))
    _write(root, "/boot/grub/grub.cfg", cfg)


def _trim(*mountpoints: Path) -> None:
    # The loop device turns discards into holes in disk.raw, so blocks freed during
    # the build (mkinitramfs' scratch copy of the modules, the replaced initramfs)
    # stay out of the VMDK. ext4 frees deleted blocks only when their journal
    # transaction commits: sync first, or fstrim finds them still in use.
    for mountpoint in mountpoints:
        commands.run(["sync", "-f", str(mountpoint)], timeout=MKFS_TIMEOUT_S)
        commands.run(["fstrim", str(mountpoint)], timeout=MKFS_TIMEOUT_S)


# --------------------------------------------------------------------------- build


def _install_guest(
    disk: Path, work: Path, variant: _Variant
) -> tuple[tuple[Partition, ...], str, bool]:
    tarball, kernel = rootfs_tarball()
    parts = _partition_disk(disk, variant)
    by_role = {p.role: p for p in parts}
    with contextlib.ExitStack() as stack:
        whole = stack.enter_context(_loop(disk))
        devices = {
            role: stack.enter_context(_loop(disk, by_role[role]))
            for role in ("boot", "root", "swap")
        }
        for role, device in devices.items():
            _make_filesystem(by_role[role], device)
        root = stack.enter_context(_mounted(devices["root"], work / "mnt"))
        stack.enter_context(_mounted(devices["boot"], root / "boot"))
        _unpack_rootfs(tarball, root)
        _configure_guest(root, variant)
        modules = _rebuild_initramfs(root, kernel)
        _check_initramfs(variant, modules)
        _install_grub(root, whole, kernel, parts)
        _trim(root / "boot", root)
    return parts, kernel, "virtio_blk" in modules


def _export_vmdk(raw: Path, vmdk: Path) -> None:
    # monolithicSparse: one self-contained file, the shape VMware exports arrive in.
    argv = ["qemu-img", "convert", "-f", "raw", "-O", "vmdk"]
    argv += ["-o", "subformat=monolithicSparse", str(raw), str(vmdk)]
    commands.run(argv, timeout=CONVERT_TIMEOUT_S)


def _build_variant(variant: _Variant, out: Path) -> None:
    work = out / "work"
    work.mkdir()
    disk = work / "disk.raw"
    parts, kernel, has_virtio_blk = _install_guest(disk, work, variant)
    _export_vmdk(disk, out / "disk.vmdk")
    if toolkit.is_mounted_under(work):
        raise BootableBuildError(f"{work} still has mounts after the build")
    shutil.rmtree(work)
    notes = BootableNotes(
        variant=variant.name,
        kernel_version=kernel,
        hostname=HOSTNAME,
        root_password=ROOT_PASSWORD,
        fstab=FSTAB,
        kernel_cmdline=f"root=UUID={_uuid(variant, 9, ROOT_PART)} ro {SERIAL_CMDLINE}",
        initramfs_path=f"/boot/initrd.img-{kernel}",
        initramfs_modules=variant.modules,
        initramfs_module_list=variant.module_list,
        initramfs_has_virtio_blk=has_virtio_blk,
        disk_guid=_uuid(variant, 8, 0),
        virtual_size=DISK_MIB * MiB,
        partitions=parts,
    )
    manifest = {"file": "disk.vmdk", "fmt": "vmdk", "notes": dataclasses.asdict(notes)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _load(final: Path) -> BootableImage:
    manifest: dict[str, Any] = json.loads((final / MANIFEST).read_text())
    raw = dict(manifest["notes"])
    raw["partitions"] = tuple(Partition(**p) for p in raw["partitions"])
    raw["initramfs_module_list"] = tuple(raw["initramfs_module_list"])
    return BootableImage(str(final / manifest["file"]), manifest["fmt"], BootableNotes(**raw))


def _bootable(variant: _Variant) -> BootableImage:
    final = _cache_root() / f"bootable-{disks_key()}" / variant.name
    if not (final / MANIFEST).exists():
        # The rootfs first, under its own lock, so the disk lock is never held
        # for the minutes of a debootstrap another variant may be waiting on.
        rootfs_tarball()
        _publish(final, lambda out: _build_variant(variant, out))
    return _load(final)


def bootable_debian_bios() -> BootableImage:
    """Debian 12, GRUB on BIOS/GPT, /dev/sdX in fstab, MODULES=most initramfs (has virtio_blk)."""
    return _bootable(BIOS)


def bootable_debian_bios_modules_list() -> BootableImage:
    """As bootable_debian_bios, but MODULES=list: VMware's disk drivers and ext4, no virtio_blk."""
    return _bootable(BIOS_MODULES_LIST)


ALL_BOOTABLE: dict[str, Callable[[], BootableImage]] = {
    "bootable_debian_bios": bootable_debian_bios,
    "bootable_debian_bios_modules_list": bootable_debian_bios_modules_list,
}


def main() -> None:
    print(f"cache: {_cache_root()}  rootfs {rootfs_key()}  disks {disks_key()}")
    total = time.monotonic()
    started = time.monotonic()
    tarball, kernel = rootfs_tarball()
    print(f"{'rootfs (debootstrap)':34s} {time.monotonic() - started:7.2f}s  {tarball} ({kernel})")
    for name, build in ALL_BOOTABLE.items():
        started = time.monotonic()
        built = build()
        print(f"{name:34s} {time.monotonic() - started:7.2f}s  {built.path}")
    print(f"total {time.monotonic() - total:.2f}s")


if __name__ == "__main__":
    try:
        main()
    except (CommandError, ImageBuildError) as exc:
        sys.exit(f"build failed: {exc}")
