"""A real, bootable Debian 12 guest on LVM over two disks, laid out as Debian's installer does.

Disk 1 (GPT): a BIOS boot partition, /boot (ext4) and a "Linux LVM" partition holding
PV 0 of VG `deb12-vg` (the installer's `<hostname>-vg`); disk 2: a whole-disk PV 1, no
partition table. LVs: `root` (ext4, one segment on PV 0), `swap_1` and `srv` (ext4),
whose first segment ends PV 0 and whose second opens PV 1, with a data file that lies
wholly in the second segment. fstab and the kernel command line name the LVs by their
/dev/mapper paths, as the installer writes them; GRUB needs no LVM since /boot is a
plain partition. The guest has lvm2, so its initramfs activates the root LV at boot.

Built with bootable.py's pieces (chroot, unpack, initramfs, VMDK export, cache publish)
and lvmkit's LVM without device-mapper. Two cache levels under `$VMCRAFT_SAMPLES_DIR`,
apart from bootable.py's, whose keys this module leaves alone:

- `bootable-lvm-rootfs-<key>/rootfs.tar.zst`: debootstrap of bootable.PACKAGES + lvm2;
- `bootable-lvm-<key>/debian12-lvm/disk1.vmdk, disk2.vmdk`: the two disks.

Run `python -m vmcraft_tasks.samples.bootable_lvm` to warm the cache and print timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.samples import bootable, lvmkit, toolkit
from vmcraft_tasks.samples.bootable import (
    BIOS_BOOT_MIB,
    BOOT_MIB,
    DEBOOTSTRAP_TIMEOUT_S,
    DEBOOTSTRAP_VARIANT,
    GPT_HEAD_MIB,
    GPT_TAIL_MIB,
    MIRROR,
    MKFS_TIMEOUT_S,
    ROOT_PASSWORD,
    ROOTFS_TARBALL,
    SERIAL_CMDLINE,
    SUITE,
    BootableBuildError,
    Partition,
)
from vmcraft_tasks.samples.lvmkit import EXTENT, PE_START, LVSpec, PVSpec, SegSpec
from vmcraft_tasks.samples.toolkit import (
    GPT_BIOS_BOOT,
    GPT_LINUX_FS,
    MANIFEST,
    BuiltImage,
    ImageBuildError,
    MiB,
    Part,
)

# lvm2 pulls in dmsetup, dmeventd and its libraries; its initramfs-tools hook puts
# lvm and dm-mod into the initramfs.
PACKAGES = (*bootable.PACKAGES, "lvm2")
VARIANT = bootable._Variant("debian12-lvm", 3, "most", (), expect_virtio_blk=True)

GPT_LINUX_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"

HOSTNAME = "deb12"
VG_NAME = f"{HOSTNAME}-vg"
DISK1_MIB = 2048
DISK2_MIB = 256
BIOS_BOOT_PART, BOOT_PART, LVM_PART = 1, 2, 3
LVM_PART_MIB = DISK1_MIB - GPT_HEAD_MIB - BIOS_BOOT_MIB - BOOT_MIB - GPT_TAIL_MIB
PV0_EXTENTS = (LVM_PART_MIB * MiB - PE_START) // EXTENT
PV1_EXTENTS = (DISK2_MIB * MiB - PE_START) // EXTENT
# PV 0: root [0, 415), swap_1 [415, 431), srv [431, 447); PV 1: srv [0, 32), then free.
SWAP_EXTENTS = 16
SRV_EXTENTS = (16, 32)
ROOT_EXTENTS = PV0_EXTENTS - SWAP_EXTENTS - SRV_EXTENTS[0]
# Inside the srv LV; the guest sees it under /srv.
SRV_DATA = "/vmcraft/segment2.dat"
SRV_DATA_MIB = 8

# Filesystem UUIDs are bootable._uuid(VARIANT, 9, n), GPT ones kind 8: /boot's n is its
# partition number, each LV's its own. LV -> (mountpoint, filesystem, n).
BOOT_UUID_N = BOOT_PART
LV_FILESYSTEMS: dict[str, tuple[str | None, str, int]] = {
    "root": ("/", "ext4", 10),
    "swap_1": (None, "swap", 11),
    "srv": ("/srv", "ext4", 12),
}


def mapper_path(vg: str, lv: str) -> str:
    """/dev/mapper name of an LV: device-mapper doubles the dashes inside each name."""
    return f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"


ROOT_DEVICE = mapper_path(VG_NAME, "root")
KERNEL_CMDLINE = f"root={ROOT_DEVICE} ro {SERIAL_CMDLINE}"


def _fs_uuid(n: int) -> str:
    return bootable._uuid(VARIANT, 9, n)


def _fstab() -> str:
    # What Debian 12's installer writes for "guided - use entire disk and set up LVM",
    # plus /srv on an LV of its own.
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
{mapper_path(VG_NAME, "root")} /               ext4    errors=remount-ro 0       1
# /boot was on /dev/sda2 during installation
UUID={_fs_uuid(BOOT_UUID_N)} /boot           ext4    defaults        0       2
{mapper_path(VG_NAME, "srv")} /srv            ext4    defaults        0       2
{mapper_path(VG_NAME, "swap_1")} none            swap    sw              0       0
"""


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class PhysicalVolume:
    key: str  # its name in the VG metadata: pv0, pv1
    uuid: str
    disk: int  # 1: disk1.vmdk, 2: disk2.vmdk
    partition: int | None  # None: the whole disk
    offset: int  # bytes into the disk
    size: int
    pe_count: int


@dataclass(frozen=True)
class Segment:
    pv: str  # PhysicalVolume.key
    pv_start: int  # first extent on that PV
    extents: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    uuid: str
    mapper: str  # /dev/mapper/deb12--vg-root
    mountpoint: str | None  # None: swap
    fs_type: str  # ext4 | swap
    fs_uuid: str
    size: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    extent_size: int
    pvs: tuple[PhysicalVolume, ...]
    lvs: tuple[LogicalVolume, ...]

    def lv(self, name: str) -> LogicalVolume:
        for lv in self.lvs:
            if lv.name == name:
                return lv
        raise KeyError(f"no LV {name} in {self.name}")


@dataclass(frozen=True)
class SegmentData:
    """A file of an LV whose bytes all lie past the LV's first segment."""

    lv: str
    path: str  # in the guest
    size: int
    sha256: str
    lowest_lv_offset: int  # the first byte of it in the LV, >= first_segment_size
    first_segment_size: int


@dataclass(frozen=True)
class LvmBootableNotes:
    variant: str
    kernel_version: str
    hostname: str
    root_password: str
    fstab: str
    kernel_cmdline: str
    initramfs_path: str  # inside the guest, on /boot
    initramfs_has_lvm: bool  # the lvm binary and dm-mod
    initramfs_has_virtio_blk: bool
    disk_files: tuple[str, ...]  # in disk order; lvmkit.disk_paths reads this
    virtual_sizes: tuple[int, ...]
    disk_guid: str  # disk 1's GPT; disk 2 has no partition table
    partitions: tuple[Partition, ...]  # disk 1
    vg: VolumeGroup
    srv_data: SegmentData

    @property
    def boot_uuid(self) -> str:
        return _fs_uuid(BOOT_UUID_N)

    @property
    def fs_uuids(self) -> dict[str, str]:
        """boot, root, swap_1, srv -> filesystem (or swap) UUID."""
        return {"boot": self.boot_uuid} | {lv.name: lv.fs_uuid for lv in self.vg.lvs}


@dataclass(frozen=True)
class LvmBootableImage:
    path: str  # disk 1
    fmt: str
    notes: LvmBootableNotes

    @property
    def paths(self) -> tuple[str, ...]:
        folder = Path(self.path).parent
        return tuple(str(folder / name) for name in self.notes.disk_files)

    def as_built_image(self) -> BuiltImage:
        """The toolkit's shape: `path` is disk 1, notes["disk_files"] names every disk."""
        return BuiltImage(self.path, self.fmt, dataclasses.asdict(self.notes))


def _notes_from_json(raw: dict[str, Any]) -> LvmBootableNotes:
    vg = dict(raw["vg"])
    vg["pvs"] = tuple(PhysicalVolume(**pv) for pv in vg["pvs"])
    vg["lvs"] = tuple(
        LogicalVolume(**{**lv, "segments": tuple(Segment(**s) for s in lv["segments"])})
        for lv in vg["lvs"]
    )
    return LvmBootableNotes(
        **{
            **raw,
            "disk_files": tuple(raw["disk_files"]),
            "virtual_sizes": tuple(raw["virtual_sizes"]),
            "partitions": tuple(Partition(**p) for p in raw["partitions"]),
            "vg": VolumeGroup(**vg),
            "srv_data": SegmentData(**raw["srv_data"]),
        }
    )


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
        # bootable.py's deb cache: only lvm2 and its dependencies are new downloads.
        _debootstrap(target, bootable._cache_root() / "bootable-debs")
        if not (target / "usr/sbin/lvm").exists():
            raise BootableBuildError(f"debootstrap of {PACKAGES} left no /usr/sbin/lvm")
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


def disks_key() -> str:
    # bootable.disks_key covers bootable.py and the toolkit's partitioning.
    sources = (Path(__file__), Path(lvmkit.__file__))
    return bootable._digest(rootfs_key(), bootable.disks_key(), *(p.read_text() for p in sources))


def rootfs_tarball() -> tuple[Path, str]:
    """The cached debootstrap tarball with lvm2 and its kernel version; built on first use."""
    final = bootable._cache_root() / f"bootable-lvm-rootfs-{rootfs_key()}"
    if not (final / MANIFEST).exists():
        bootable._publish(final, _build_rootfs)
    manifest = json.loads((final / MANIFEST).read_text())
    return final / ROOTFS_TARBALL, str(manifest["kernel_version"])


# --------------------------------------------------------------------------- disks and VG


def _partition_disk1(disk: Path) -> tuple[Partition, ...]:
    layout = [
        (BIOS_BOOT_PART, "bios_boot", BIOS_BOOT_MIB, GPT_BIOS_BOOT, None, None),
        (BOOT_PART, "boot", BOOT_MIB, GPT_LINUX_FS, "ext4", _fs_uuid(BOOT_UUID_N)),
        (LVM_PART, "lvm", LVM_PART_MIB, GPT_LINUX_LVM, "LVM2_member", _lvm_uuid("pv0")),
    ]
    parts = [
        Part(size_mib, type_guid, name=role, partuuid=bootable._uuid(VARIANT, 8, number))
        for number, role, size_mib, type_guid, _, _ in layout
    ]
    made = toolkit.assemble(disk, DISK1_MIB, "gpt", bootable._uuid(VARIANT, 8, 0), parts)
    return tuple(
        Partition(
            number=number,
            role=role,
            start=made[number]["start"],
            size=made[number]["size"],
            type_guid=type_guid,
            partuuid=bootable._uuid(VARIANT, 8, number),
            fs_type=fs_type,
            fs_uuid=fs_uuid,  # blkid's UUID: a PV's is its PV UUID
        )
        for number, role, _, type_guid, fs_type, fs_uuid in layout
    )


def _lvm_uuid(what: str) -> str:
    return lvmkit.lvm_uuid(f"{VARIANT.name}-{what}")


def _lv_specs() -> dict[str, LVSpec]:
    root_end = ROOT_EXTENTS + SWAP_EXTENTS
    segments = {
        "root": (SegSpec(ROOT_EXTENTS, "pv0", 0),),
        "swap_1": (SegSpec(SWAP_EXTENTS, "pv0", ROOT_EXTENTS),),
        "srv": (SegSpec(SRV_EXTENTS[0], "pv0", root_end), SegSpec(SRV_EXTENTS[1], "pv1", 0)),
    }
    return {name: LVSpec(name, _lvm_uuid(name), segs) for name, segs in segments.items()}


def _make_volume_group(disk1: Path, disk2: Path, lvm_part: Partition, work: Path) -> VolumeGroup:
    toolkit.new_sparse_file(disk2, DISK2_MIB * MiB)
    pvs = [
        PVSpec("pv0", _lvm_uuid("pv0"), disk1, lvm_part.start, lvm_part.size),
        PVSpec("pv1", _lvm_uuid("pv1"), disk2, 0, DISK2_MIB * MiB),
    ]
    if [pv.pe_count for pv in pvs] != [PV0_EXTENTS, PV1_EXTENTS]:
        raise BootableBuildError(f"PV sizes {[pv.pe_count for pv in pvs]} are not the plan's")
    specs = _lv_specs()
    lvmkit.create_vg(VG_NAME, _lvm_uuid("vg"), pvs, list(specs.values()), work, host=HOSTNAME)
    where = {"pv0": (1, LVM_PART), "pv1": (2, None)}  # (disk, partition)
    return VolumeGroup(
        name=VG_NAME,
        uuid=_lvm_uuid("vg"),
        extent_size=EXTENT,
        pvs=tuple(
            PhysicalVolume(pv.key, pv.uuid, *where[pv.key], pv.offset, pv.size, pv.pe_count)
            for pv in pvs
        ),
        lvs=tuple(
            LogicalVolume(
                name=spec.name,
                uuid=spec.uuid,
                mapper=mapper_path(VG_NAME, spec.name),
                mountpoint=LV_FILESYSTEMS[spec.name][0],
                fs_type=LV_FILESYSTEMS[spec.name][1],
                fs_uuid=_fs_uuid(LV_FILESYSTEMS[spec.name][2]),
                size=spec.size,
                segments=tuple(Segment(s.pv, s.pv_start, s.extents) for s in spec.segments),
            )
            for spec in specs.values()
        ),
    )


def _pv_specs(vg: VolumeGroup, disks: dict[int, Path]) -> list[PVSpec]:
    return [PVSpec(pv.key, pv.uuid, disks[pv.disk], pv.offset, pv.size) for pv in vg.pvs]


def _lv_spec(lv: LogicalVolume) -> LVSpec:
    return LVSpec(
        lv.name, lv.uuid, tuple(SegSpec(s.extents, s.pv, s.pv_start) for s in lv.segments)
    )


def _lv_loop(lv: LogicalVolume, pvs: list[PVSpec]) -> contextlib.AbstractContextManager[str]:
    """A loop device over a single-segment LV's bytes in its disk file."""
    ((_, length, image, offset),) = lvmkit.lv_offsets(_lv_spec(lv), pvs)
    return toolkit.loop(image, offset=offset, sizelimit=length)


def _mkfs(fs_type: str, uuid: str, device: str) -> None:
    # No labels: the installer sets none.
    if fs_type == "swap":
        argv = ["mkswap", "-U", uuid, device]
    else:
        argv = ["mkfs.ext4", "-q", "-F", "-U", uuid, device]
    commands.run(argv, timeout=MKFS_TIMEOUT_S)


_EXTENT_LINE = re.compile(r"^\s*\d+:\s+(\d+)\.\.\s*\d+:\s+(\d+)\.\.\s*\d+:\s+(\d+):")


def _extents(path: Path) -> list[tuple[int, int, int]]:
    """(logical block, physical block, length) of each extent of `path`, in fs blocks."""
    out = commands.run(["filefrag", "-v", str(path)], timeout=MKFS_TIMEOUT_S).stdout
    found = (_EXTENT_LINE.match(line) for line in out.splitlines())
    return [(int(m[1]), int(m[2]), int(m[3])) for m in found if m]


def _run_past(extents: list[tuple[int, int, int]], first_block: int, count: int) -> int | None:
    """The first logical block of `count` blocks that all lie at or past `first_block`."""
    run_start, run_length = 0, 0
    for logical, physical, length in extents:
        skip = max(0, first_block - physical)
        if skip >= length:
            run_length = 0
            continue
        if skip or run_length == 0 or run_start + run_length != logical:
            run_start, run_length = logical + skip, length - skip
        else:
            run_length += length
        if run_length >= count:
            return run_start
    return None


def _write_past(mnt: Path, rel: str, data: bytes, boundary: int) -> None:
    """Write `data` as file `rel` of the ext4 at `mnt`, every block at or past fs byte `boundary`.

    The allocator decides where a new file goes, so this does not write one: it
    preallocates nearly all free space as the file (unwritten extents, instant),
    writes the data into a stretch of it past the boundary, then cuts away the
    blocks before that stretch (collapse-range) and after it (truncate).
    """
    stat = os.statvfs(mnt)
    bsize = stat.f_bsize
    target = mnt / rel.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    room = stat.f_bfree * bsize - 4 * MiB  # the extent tree needs a few blocks too
    commands.run(["fallocate", "-l", str(room), str(target)], timeout=MKFS_TIMEOUT_S)
    start = _run_past(_extents(target), -(-boundary // bsize), -(-len(data) // bsize))
    if start is None:
        raise BootableBuildError(f"no {len(data)} bytes free past byte {boundary} of {mnt}")
    with open(target, "r+b") as fh:
        fh.seek(start * bsize)
        fh.write(data)
        os.fsync(fh.fileno())
    if start:
        argv = ["fallocate", "--collapse-range", "--offset", "0", "--length", str(start * bsize)]
        commands.run([*argv, str(target)], timeout=MKFS_TIMEOUT_S)
    os.truncate(target, len(data))


def _make_srv(lv: LogicalVolume, pvs: list[PVSpec], work: Path) -> SegmentData:
    """ext4 made in a file, the data file put past the first segment, cut into the LV."""
    fs_file = toolkit.new_sparse_file(work / "srv.ext4", lv.size)
    _mkfs("ext4", lv.fs_uuid, str(fs_file))
    first = lv.segments[0].extents * EXTENT
    data = lvmkit.patterned(SRV_DATA_MIB * MiB, f"{HOSTNAME} srv second segment")
    with contextlib.ExitStack() as stack:
        device = stack.enter_context(toolkit.loop(fs_file))
        mnt = stack.enter_context(toolkit.mounted(device, work / "srv", "ext4"))
        bsize = os.statvfs(mnt).f_bsize  # mke2fs' "small" type: 1 KiB blocks
        _write_past(mnt, SRV_DATA, data, first)
        bootable._trim(mnt)
        # Its data blocks (debugfs `blocks` would list its extent tree's blocks too).
        extents = _extents(mnt / SRV_DATA.lstrip("/"))
    lowest = min(physical for _, physical, _ in extents) * bsize
    if lowest < first or sum(n for _, _, n in extents) * bsize != len(data):
        raise BootableBuildError(f"srv: {SRV_DATA} is not wholly past byte {first}: {extents}")
    commands.run(["e2fsck", "-fn", str(fs_file)], timeout=MKFS_TIMEOUT_S)
    check = work / "srv.check"
    commands.run(["debugfs", "-R", f"dump {SRV_DATA} {check}", str(fs_file)], timeout=60)
    if check.read_bytes() != data:
        raise BootableBuildError(f"srv: {SRV_DATA} does not read back as written")
    check.unlink()
    lvmkit.write_lv(_lv_spec(lv), pvs, fs_file)
    fs_file.unlink()
    return SegmentData(
        lv=lv.name,
        path=f"/srv{SRV_DATA}",
        size=len(data),
        sha256=lvmkit.sha256(data),
        lowest_lv_offset=lowest,
        first_segment_size=first,
    )


# --------------------------------------------------------------------------- guest


def _grub_cfg(kernel: str, boot_uuid: str) -> str:
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
    linux /vmlinuz-{kernel} {KERNEL_CMDLINE}
    echo 'Loading initial ramdisk ...'
    initrd /initrd.img-{kernel}
}}
"""


def _configure_guest(root: Path) -> None:
    bootable._write(root, "/etc/fstab", _fstab())
    bootable._write(root, "/etc/hostname", HOSTNAME + "\n")
    bootable._write(root, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    bootable._write(root, "/etc/machine-id", f"b007{VARIANT.number:028x}\n")
    bootable._write(root, "/etc/default/grub", bootable._etc_default_grub())
    # As bootable.py: no resume device to wait for on every boot.
    bootable._write(root, "/etc/initramfs-tools/conf.d/resume", "RESUME=none\n")
    bootable._set_initramfs_modules(root, VARIANT)
    (root / "srv").mkdir(exist_ok=True)
    bootable._in_guest(root, ["chpasswd"], input_text=f"root:{ROOT_PASSWORD}\n")


def _check_initramfs_lvm(root: Path, kernel: str, modules: frozenset[str]) -> None:
    # bookworm's lvm2 activates from udev (69-lvm.rules runs `vgchange -aay` once every
    # PV of the VG has appeared); there is no local-top script. The paths are listed
    # under usr/ or not depending on the initramfs' merged-/usr layout.
    listing = bootable._in_guest(root, ["lsinitramfs", f"/boot/initrd.img-{kernel}"]).split()
    present = {name.removeprefix("usr/") for name in listing}
    needed = ("sbin/lvm", "sbin/dmsetup", "lib/udev/rules.d/69-lvm.rules", "etc/lvm/lvm.conf")
    missing = [name for name in needed if name not in present]
    if "dm-mod" not in modules:
        missing.append("dm-mod")
    if missing:
        raise BootableBuildError(f"{VARIANT.name}: initramfs lacks {missing}")


def _install_grub(root: Path, disk_device: str, kernel: str) -> None:
    # As bootable._install_grub: /boot is on a loop device of its own, so name the modules.
    argv = ["grub-install", "--target=i386-pc", "--boot-directory=/boot"]
    argv += ["--modules=part_gpt ext2 search_fs_uuid biosdisk", disk_device]
    bootable._in_guest(root, argv)
    bootable._write(root, "/boot/grub/grub.cfg", _grub_cfg(kernel, _fs_uuid(BOOT_UUID_N)))


def _install_guest(
    disk1: Path, boot: Partition, vg: VolumeGroup, pvs: list[PVSpec], work: Path
) -> tuple[str, bool]:
    tarball, kernel = rootfs_tarball()
    with contextlib.ExitStack() as stack:
        whole = stack.enter_context(bootable._loop(disk1))
        boot_dev = stack.enter_context(bootable._loop(disk1, boot))
        root_dev = stack.enter_context(_lv_loop(vg.lv("root"), pvs))
        swap_dev = stack.enter_context(_lv_loop(vg.lv("swap_1"), pvs))
        _mkfs("ext4", _fs_uuid(BOOT_UUID_N), boot_dev)
        _mkfs("ext4", vg.lv("root").fs_uuid, root_dev)
        _mkfs("swap", vg.lv("swap_1").fs_uuid, swap_dev)
        root = stack.enter_context(bootable._mounted(root_dev, work / "mnt"))
        stack.enter_context(bootable._mounted(boot_dev, root / "boot"))
        bootable._unpack_rootfs(tarball, root)
        _configure_guest(root)
        modules = bootable._rebuild_initramfs(root, kernel)
        bootable._check_initramfs(VARIANT, modules)
        _check_initramfs_lvm(root, kernel, modules)
        _install_grub(root, whole, kernel)
        bootable._trim(root / "boot", root)
    return kernel, "virtio_blk" in modules


# --------------------------------------------------------------------------- build


def _build(out: Path) -> None:
    work = out / "work"
    work.mkdir()
    disks = {1: work / "disk1.raw", 2: work / "disk2.raw"}
    parts = _partition_disk1(disks[1])
    by_role = {p.role: p for p in parts}
    vg = _make_volume_group(disks[1], disks[2], by_role["lvm"], work)
    pvs = _pv_specs(vg, disks)
    srv_data = _make_srv(vg.lv("srv"), pvs, work)
    kernel, has_virtio_blk = _install_guest(disks[1], by_role["boot"], vg, pvs, work)
    files = tuple(f"disk{n}.vmdk" for n in disks)
    for name, raw in zip(files, disks.values(), strict=True):
        bootable._export_vmdk(raw, out / name)
    if toolkit.is_mounted_under(work):
        raise BootableBuildError(f"{work} still has mounts after the build")
    shutil.rmtree(work)
    notes = LvmBootableNotes(
        variant=VARIANT.name,
        kernel_version=kernel,
        hostname=HOSTNAME,
        root_password=ROOT_PASSWORD,
        fstab=_fstab(),
        kernel_cmdline=KERNEL_CMDLINE,
        initramfs_path=f"/boot/initrd.img-{kernel}",
        initramfs_has_lvm=True,  # _check_initramfs_lvm raised otherwise
        initramfs_has_virtio_blk=has_virtio_blk,
        disk_files=files,
        virtual_sizes=(DISK1_MIB * MiB, DISK2_MIB * MiB),
        disk_guid=bootable._uuid(VARIANT, 8, 0),
        partitions=parts,
        vg=vg,
        srv_data=srv_data,
    )
    manifest = {"file": files[0], "fmt": "vmdk", "notes": dataclasses.asdict(notes)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _load(final: Path) -> LvmBootableImage:
    manifest: dict[str, Any] = json.loads((final / MANIFEST).read_text())
    notes = _notes_from_json(manifest["notes"])
    return LvmBootableImage(str(final / manifest["file"]), manifest["fmt"], notes)


def bootable_debian_lvm() -> LvmBootableImage:
    """Debian 12 on LVM over two disks (VG deb12-vg: root, swap_1, srv across both)."""
    final = bootable._cache_root() / f"bootable-lvm-{disks_key()}" / VARIANT.name
    if not (final / MANIFEST).exists():
        # The rootfs first, under its own lock, as bootable._bootable does.
        rootfs_tarball()
        bootable._publish(final, _build)
    return _load(final)


def main() -> None:
    print(f"cache: {bootable._cache_root()}  rootfs {rootfs_key()}  disks {disks_key()}")
    total = time.monotonic()
    tarball, kernel = rootfs_tarball()
    print(f"{'rootfs (debootstrap + lvm2)':34s} {time.monotonic() - total:7.2f}s  {tarball}")
    started = time.monotonic()
    built = bootable_debian_lvm()
    print(f"{'bootable_debian_lvm':34s} {time.monotonic() - started:7.2f}s  {built.paths}")
    print(f"kernel {kernel}  total {time.monotonic() - total:.2f}s")


if __name__ == "__main__":
    try:
        main()
    except (CommandError, ImageBuildError) as exc:
        sys.exit(f"build failed: {exc}")
