"""Build realistic sample disk images (for tests and demos) once, and cache them on disk.

Each filesystem is made in its own sparse file (mkfs populating from a staging
directory wherever the tool can), then written into a partitioned disk file at its
partition's offset. Only the dirty/broken journal images and NTFS need a mount, and
those mounts and loop devices are always undone in `finally` blocks.

The cache lives in `$VMCRAFT_SAMPLES_DIR` (default /var/tmp/vmcraft-samples),
under a short hash of the builders' sources (this file and hive.py), so editing
either rebuilds. Builds
hold an fcntl lock and land atomically (temp dir, then rename), so concurrent
pytest processes share one build and never see a half-made image.

Run `python -m vmcraft_tasks.samples.imagebuild` to warm the cache and print timings.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.samples import hive

MiB = 1024 * 1024
SECTOR = 512
CACHE_ROOT_ENV = "VMCRAFT_SAMPLES_DIR"
DEFAULT_CACHE_ROOT = "/var/tmp/vmcraft-samples"
MANIFEST = "image.json"

MKFS_TIMEOUT_S = 120.0
MOUNT_TIMEOUT_S = 60.0
CONVERT_TIMEOUT_S = 300.0

GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_LINUX_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"

DEBIAN_KERNEL = "6.1.0-18-amd64"
AFTER_CRASH_PATH = "/after-crash.txt"
AFTER_CRASH_TEXT = "this file exists only in the journal until it is replayed\n"
BEFORE_CRASH_PATH = "/before-crash.txt"
BEFORE_CRASH_TEXT = "written by mkfs, on disk before the crash\n"


class ImageBuildError(RuntimeError):
    """A test image could not be put into the state its notes promise."""


@dataclass(frozen=True)
class BuiltImage:
    path: str
    fmt: str
    # compare/hash off: a dict field would make the frozen dataclass unhashable.
    notes: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# --------------------------------------------------------------------------- cache


# Every module whose source decides what an image holds: editing any one rebuilds.
BUILDER_SOURCES = (Path(__file__), Path(hive.__file__))


def builder_hash() -> str:
    digest = hashlib.sha256()
    for source in BUILDER_SOURCES:
        data = source.read_bytes()
        # Length-prefixed, so moving code from one file to the other changes the hash.
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ROOT_ENV, DEFAULT_CACHE_ROOT))
    path = root / builder_hash()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _int_keys(obj: dict[str, Any]) -> dict[Any, Any]:
    # JSON turns partition-number keys into strings; undo that so cold and warm
    # runs hand tests identical notes.
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


def _load(final: Path) -> BuiltImage:
    manifest = json.loads((final / MANIFEST).read_text(), object_hook=_int_keys)
    return BuiltImage(str(final / manifest["file"]), manifest["fmt"], manifest["notes"])


def _is_mounted_under(path: Path) -> bool:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4].startswith(prefix) for line in fh)


def _remove_stale_builds(directory: Path) -> None:
    # Called under the lock, so any temp dir is from a build that died; one that
    # still has something mounted inside is left alone rather than rmtree'd through.
    for stale in directory.glob(".build-*"):
        if not _is_mounted_under(stale):
            shutil.rmtree(stale, ignore_errors=True)


Builder = Callable[[Path, Path], tuple[str, str, dict[str, Any]]]


def _cached(name: str, build: Builder) -> BuiltImage:
    """Return image `name`, running `build(out_dir, work_dir)` first if it is not cached.

    `build` writes its image into out_dir and returns (file name, format, notes);
    work_dir is scratch space, deleted before the result is published.
    """
    base = cache_dir()
    final = base / name
    if (final / MANIFEST).exists():
        return _load(final)
    with _build_lock(base):
        if (final / MANIFEST).exists():
            return _load(final)
        _remove_stale_builds(base)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=base))
        try:
            work = tmp / "work"
            work.mkdir()
            file_name, fmt, notes = build(tmp, work)
            shutil.rmtree(work)
            manifest = {"file": file_name, "fmt": fmt, "notes": notes}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        finally:
            if tmp.exists() and not _is_mounted_under(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_image(built: BuiltImage | str, dest_dir: str | os.PathLike[str]) -> str:
    """Copy an image (sparse) into dest_dir so a test can modify it; returns the new path."""
    src = built.path if isinstance(built, BuiltImage) else str(built)
    dest = Path(dest_dir) / Path(src).name
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    commands.run(["cp", "--sparse=always", src, str(dest)], timeout=CONVERT_TIMEOUT_S)
    return str(dest)


def _new_sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


_ZERO_CHUNK = bytes(64 * 1024)


def _copy_sparse(src: Path, dst: Path, dst_offset: int = 0) -> None:
    """Write src's data into the existing file dst at dst_offset, leaving holes for zeros.

    Zero chunks are skipped as well as holes because mkfs.xfs writes its 64 MiB
    log out as zeros, which would otherwise bloat every disk by that much.
    """
    chunk = len(_ZERO_CHUNK)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            here = start
            while here < end:
                data = fin.read(min(chunk, end - here))
                if data != _ZERO_CHUNK[: len(data)]:
                    fout.seek(dst_offset + here)
                    fout.write(data)
                here += len(data)
            pos = end


def _sparse_clone(src: Path, dst: Path) -> None:
    _new_sparse_file(dst, src.stat().st_size)
    _copy_sparse(src, dst)


def _write_tree(root: Path, files: dict[str, str | bytes], symlinks: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    for rel, target in symlinks.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)


def _text_files(files: dict[str, str | bytes]) -> dict[str, str]:
    return {path: content for path, content in files.items() if isinstance(content, str)}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _gpt_uuid(image_id: int, n: int) -> str:
    return f"5eed{image_id:04x}-0000-4000-8000-{n:012x}"


def _fs_uuid(image_id: int, n: int) -> str:
    return f"f5{image_id:06x}-0000-4000-8000-{n:012x}"


# --------------------------------------------------------------------------- filesystems


def _mkfs_ext4(path: Path, size_mib: int, label: str, uuid: str, src: Path | None) -> None:
    _new_sparse_file(path, size_mib * MiB)
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-U", uuid]
    argv += ["-E", "root_owner=0:0"]
    if src is not None:
        argv += ["-d", str(src)]
    commands.run([*argv, str(path)], timeout=MKFS_TIMEOUT_S)


def _xfs_proto(src: Path) -> str:
    """Describe src as an mkfs.xfs prototype file, so xfs is populated without a mount."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def mode(st: os.stat_result, kind: str) -> str:
        suid = "u" if st.st_mode & stat.S_ISUID else "-"
        sgid = "g" if st.st_mode & stat.S_ISGID else "-"
        return f"{kind}{suid}{sgid}{stat.S_IMODE(st.st_mode) & 0o777:03o}"

    def walk(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            st = entry.lstat()
            # The proto format is whitespace-separated with no quoting.
            if any(ch.isspace() for ch in str(entry)):
                raise ImageBuildError(f"xfs proto cannot express a path with spaces: {entry}")
            if stat.S_ISLNK(st.st_mode):
                lines.append(f"{entry.name} {mode(st, 'l')} 0 0 {os.readlink(entry)}")
            elif stat.S_ISDIR(st.st_mode):
                lines.append(f"{entry.name} {mode(st, 'd')} 0 0")
                walk(entry)
                lines.append("$")
            else:
                lines.append(f"{entry.name} {mode(st, '-')} 0 0 {entry}")

    walk(src)
    lines.append("$")
    return "\n".join(lines) + "\n"


def _mkfs_xfs(path: Path, size_mib: int, label: str, uuid: str, src: Path | None) -> None:
    _new_sparse_file(path, size_mib * MiB)
    argv = ["mkfs.xfs", "-q", "-f", "-L", label, "-m", f"uuid={uuid}"]
    if src is not None:
        proto = path.with_name(path.name + ".proto")
        proto.write_text(_xfs_proto(src))
        argv += ["-p", str(proto)]
    commands.run([*argv, str(path)], timeout=MKFS_TIMEOUT_S)


def _mkfs_btrfs(path: Path, size_mib: int, label: str, uuid: str, src: Path) -> None:
    _new_sparse_file(path, size_mib * MiB)
    commands.run(
        ["mkfs.btrfs", "-q", "-f", "-L", label, "-U", uuid, "--rootdir", str(src), str(path)],
        timeout=MKFS_TIMEOUT_S,
    )


def _mkswap(path: Path, size_mib: int, label: str, uuid: str) -> None:
    _new_sparse_file(path, size_mib * MiB)
    commands.run(["mkswap", "-L", label, "-U", uuid, str(path)], timeout=MKFS_TIMEOUT_S)


def _mtools_env() -> dict[str, str]:
    # Skip mtools' geometry sanity check, which rejects plain image files.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _mkfs_vfat(
    path: Path,
    size_mib: int,
    label: str,
    volume_id: str,
    *,
    files: dict[str, str | bytes],
    fat: int,
) -> None:
    _new_sparse_file(path, size_mib * MiB)
    commands.run(
        ["mkfs.vfat", "-F", str(fat), "-n", label, "-i", volume_id, str(path)],
        timeout=MKFS_TIMEOUT_S,
    )
    staging = path.with_name(path.name + ".d")
    _write_tree(staging, files, {})
    dirs = sorted({str(Path(p).parent) for p in files} - {"/"})
    wanted: list[str] = []
    for d in dirs:
        parts = Path(d).parts[1:]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if sub not in wanted:
                wanted.append(sub)
    if wanted:
        commands.run(
            ["mmd", "-i", str(path), *[f"::{d}" for d in wanted]],
            timeout=MKFS_TIMEOUT_S,
            env=_mtools_env(),
        )
    for rel in files:
        commands.run(
            ["mcopy", "-i", str(path), str(staging / rel.lstrip("/")), f"::{rel}"],
            timeout=MKFS_TIMEOUT_S,
            env=_mtools_env(),
        )


@contextlib.contextmanager
def _loop(path: Path) -> Iterator[str]:
    dev = commands.run(["losetup", "--show", "-f", str(path)], timeout=MOUNT_TIMEOUT_S)
    device = dev.stdout.strip()
    try:
        yield device
    finally:
        commands.run(["losetup", "-d", device], timeout=MOUNT_TIMEOUT_S)


@contextlib.contextmanager
def _mounted(source: str, mnt: Path, fstype: str, options: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    commands.run(["mount", "-t", fstype, "-o", options, source, str(mnt)], timeout=MOUNT_TIMEOUT_S)
    try:
        yield mnt
    finally:
        commands.run(["umount", str(mnt)], timeout=MOUNT_TIMEOUT_S)


def _mount_fails(dev: str, mnt: Path, fstype: str, options: str) -> str:
    """Assert that mounting fails; returns mount's complaint."""
    mnt.mkdir(parents=True, exist_ok=True)
    result = commands.run(
        ["mount", "-t", fstype, "-o", options, dev, str(mnt)],
        timeout=MOUNT_TIMEOUT_S,
        check=False,
    )
    if result.returncode == 0:
        commands.run(["umount", str(mnt)], timeout=MOUNT_TIMEOUT_S)
        raise ImageBuildError(f"mount -o {options} of a broken {fstype} unexpectedly worked")
    # The build's temp mount point means nothing later; keep only the complaint.
    return result.stderr.strip().replace(str(mnt), "<mountpoint>")


def _wait_for_mount(mnt: Path, proc: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    target = str(mnt)
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as fh:
            if any(line.split()[4] == target for line in fh):
                return
        if proc.poll() is not None:
            raise ImageBuildError(f"ntfs-3g exited with {proc.returncode} before mounting")
        time.sleep(0.02)
    raise ImageBuildError(f"ntfs-3g did not mount {mnt} within {timeout}s")


def _mkfs_ntfs(
    path: Path,
    size_mib: int,
    label: str,
    *,
    serial: str,
    hidden_sectors: int,
    files: dict[str, str | bytes],
    dirs: list[str],
    work: Path,
) -> None:
    _new_sparse_file(path, size_mib * MiB)
    commands.run(
        ["mkntfs", "-Q", "-F", "-q", "-L", label, "-p", str(hidden_sectors), str(path)],
        timeout=MKFS_TIMEOUT_S,
    )
    commands.run(["ntfslabel", f"--new-serial={serial}", str(path)], timeout=MKFS_TIMEOUT_S)
    mnt = work / "ntfs-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    # no_detach keeps ntfs-3g as our child, so we can wait for it to finish
    # writing after the unmount instead of guessing, and never look it up by name.
    proc = commands.spawn_detached(
        ["ntfs-3g", "-o", "no_detach", str(path), str(mnt)],
        stderr_path=str(work / "ntfs-3g.stderr"),
    )
    try:
        _wait_for_mount(mnt, proc, timeout=15.0)
        try:
            for d in dirs:
                (mnt / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
            _write_tree(mnt, files, {})
        finally:
            commands.run(["umount", str(mnt)], timeout=MOUNT_TIMEOUT_S)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if proc.returncode != 0:
        err = (work / "ntfs-3g.stderr").read_text(errors="replace")
        raise ImageBuildError(f"ntfs-3g exited {proc.returncode}: {err[-500:]}")


# --------------------------------------------------------------------------- disks


@dataclass(frozen=True)
class _Part:
    size_mib: int | None  # None: the rest of the disk (MBR extended container)
    type: str
    fs_file: Path | None = None
    name: str | None = None
    partuuid: str | None = None
    bootable: bool = False


def _sfdisk_script(table: str, disk_id: str, parts: list[_Part]) -> str:
    lines = [f"label: {table}", f"label-id: {disk_id}", "unit: sectors", ""]
    for p in parts:
        fields = []
        if p.size_mib is not None:
            fields.append(f"size={p.size_mib}MiB")
        fields.append(f"type={p.type}")
        if p.partuuid:
            fields.append(f"uuid={p.partuuid}")
        if p.name:
            fields.append(f'name="{p.name}"')
        if p.bootable:
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def _assemble(
    disk: Path, size_mib: int, table: str, disk_id: str, parts: list[_Part]
) -> dict[int, dict[str, Any]]:
    """Partition a new sparse disk and copy each filesystem file to its partition.

    Partition numbers follow sfdisk: for MBR the list is p1.., then the extended
    container, then logical partitions which sfdisk numbers from 5.
    Returns sfdisk's own view of the result, keyed by partition number.
    """
    _new_sparse_file(disk, size_mib * MiB)
    commands.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
        input_text=_sfdisk_script(table, disk_id, parts),
        timeout=MKFS_TIMEOUT_S,
    )
    layout = json.loads(commands.run(["sfdisk", "-J", str(disk)], timeout=60).stdout)
    table_json = layout["partitiontable"]
    found: dict[int, dict[str, Any]] = {}
    for entry in table_json["partitions"]:
        number = int(entry["node"][len(table_json["device"]) :])
        found[number] = entry
    if len(found) != len(parts):
        raise ImageBuildError(f"sfdisk made {len(found)} partitions, wanted {len(parts)}")
    result: dict[int, dict[str, Any]] = {}
    for number, part in zip(sorted(found), parts, strict=True):
        entry = found[number]
        start = int(entry["start"]) * SECTOR
        size = int(entry["size"]) * SECTOR
        if part.fs_file is not None:
            fs_size = part.fs_file.stat().st_size
            if fs_size > size:
                raise ImageBuildError(f"{part.fs_file} ({fs_size}) overflows partition {number}")
            _copy_sparse(part.fs_file, disk, start)
        info: dict[str, Any] = {"start": start, "size": size, "type": entry["type"]}
        if "uuid" in entry:
            info["partuuid"] = entry["uuid"].lower()  # blkid's spelling, as fstab uses
        for key in ("name", "bootable"):
            if key in entry:
                info[key] = entry[key]
        result[number] = info
    return result


def _single_partition_gpt(
    disk: Path, image_id: int, fs_file: Path, fs_mib: int, name: str
) -> dict[int, dict[str, Any]]:
    part = _Part(fs_mib, GPT_LINUX_FS, fs_file, name, _gpt_uuid(image_id, 1))
    return _assemble(disk, fs_mib + 2, "gpt", _gpt_uuid(image_id, 0), [part])


def _single_partition_notes(
    image_id: int, layout: dict[int, dict[str, Any]], fstype: str, label: str, uuid: str
) -> dict[str, Any]:
    layout[1].update(fstype=fstype, label=label, uuid=uuid)
    end = layout[1]["start"] + layout[1]["size"]
    return {
        "table": "gpt",
        "disk_guid": _gpt_uuid(image_id, 0),
        "virtual_size": end + MiB,
        "partition_count": 1,
        "partitions": layout,
        "fs_types": {1: fstype},
        "labels": {1: label},
        "fs_uuids": {1: uuid},
        "partuuids": {1: layout[1]["partuuid"]},
    }


def _convert(src: BuiltImage, out: Path, fmt: str, options: list[str]) -> BuiltImage:
    commands.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, src.path, str(out)],
        timeout=CONVERT_TIMEOUT_S,
    )
    return BuiltImage(str(out), fmt, {**src.notes, "converted_from": "raw"})


# --------------------------------------------------------------------------- 1. linux GPT

LINUX_ID = 1
LINUX_DISK_SIZE_MIB = 772  # 770 MiB of partitions + 1 MiB GPT head + 1 MiB tail

DEBIAN_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""

DPKG_STATUS = """\
Package: base-files
Status: install ok installed
Priority: required
Section: admin
Installed-Size: 341
Maintainer: Santiago Vila <sanvila@debian.org>
Architecture: amd64
Version: 12.4+deb12u5
Description: Debian base system miscellaneous files

Package: openssh-server
Status: install ok installed
Priority: optional
Section: net
Installed-Size: 1949
Maintainer: Debian OpenSSH Maintainers <debian-ssh@lists.debian.org>
Architecture: amd64
Source: openssh
Version: 1:9.2p1-2+deb12u2
Depends: openssh-client (= 1:9.2p1-2+deb12u2), libc6 (>= 2.36)
Description: secure shell (SSH) server, for secure access from remote machines
 This is the portable version of OpenSSH.

Package: linux-image-6.1.0-18-amd64
Status: install ok installed
Priority: optional
Section: kernel
Architecture: amd64
Source: linux-signed-amd64 (6.1.76+1)
Version: 6.1.76-1
Description: Linux 6.1 for 64-bit PCs (signed)

Package: nano
Status: deinstall ok config-files
Priority: important
Section: editors
Architecture: amd64
Version: 7.2-1
Description: small, friendly text editor inspired by Pico
"""

NETWORK_INTERFACES = """\
# This file describes the network interfaces available on your system
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug ens3
iface ens3 inet static
    address 192.0.2.10/24
    gateway 192.0.2.1
"""

GUEST_PASSWD = "root:x:0:0:GUEST-PASSWD-MARKER:/root:/bin/bash\n"
GUEST_SHADOW = "root:GUEST-SHADOW-MARKER:19700:0:99999:7:::\n"
VAR_LOG_MESSAGES = "Mar  1 12:00:00 web01 kernel: vmcraft-test marker: var partition log\n"
HOME_NOTES = "notes on the home partition (btrfs)\n"


def _parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value.strip('"')
    return out


def _build_linux_gpt(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    fs_uuid = {n: _fs_uuid(LINUX_ID, n) for n in (2, 3, 4, 5, 6)}
    fs_uuid[1] = "1234-ABCD"  # vfat volume id, as blkid reports it
    partuuid = {n: _gpt_uuid(LINUX_ID, n) for n in range(1, 7)}
    labels = {1: "ESP", 2: "boot", 3: "rootfs", 4: "var", 5: "home", 6: "swap"}
    partnames = {1: "esp", 2: "boot", 3: "root", 4: "var", 5: "home", 6: "swap"}
    fs_types = {1: "vfat", 2: "ext4", 3: "ext4", 4: "xfs", 5: "btrfs", 6: "swap"}
    sizes = {1: 64, 2: 100, 3: 150, 4: 320, 5: 120, 6: 16}
    mountpoints = {1: "/boot/efi", 2: "/boot", 3: "/", 4: "/var", 5: "/home", 6: "swap"}

    fstab = (
        "# /etc/fstab: static file system information.\n"
        "# <file system> <mount point>   <type>  <options>       <dump>  <pass>\n"
        "proc /proc proc defaults 0 0\n"
        "/dev/sda3 / ext4 errors=remount-ro 0 1\n"
        f"UUID={fs_uuid[2]} /boot ext4 defaults 0 2\n"
        "/dev/sda1 /boot/efi vfat umask=0077 0 1\n"
        "LABEL=var /var xfs defaults 0 2\n"
        f"PARTUUID={partuuid[5]} /home btrfs defaults 0 0\n"
        f"/dev/disk/by-uuid/{fs_uuid[6]} none swap sw 0 0\n"
    )
    grub_cfg = (
        "set default=0\nset timeout=5\n"
        "menuentry 'Debian GNU/Linux' {\n"
        f"    search --no-floppy --fs-uuid --set=root {fs_uuid[2]}\n"
        f"    linux /vmlinuz-{DEBIAN_KERNEL} root=/dev/sda3 ro quiet\n"
        f"    initrd /initrd.img-{DEBIAN_KERNEL}\n"
        "}\n"
    )
    ls_elf = Path("/usr/bin/true").read_bytes()

    esp_files: dict[str, str | bytes] = {
        "/EFI/debian/grubx64.efi": "dummy grubx64.efi for vmcraft tests\n",
    }
    boot_files: dict[str, str | bytes] = {
        f"/vmlinuz-{DEBIAN_KERNEL}": f"dummy kernel {DEBIAN_KERNEL}\n",
        f"/initrd.img-{DEBIAN_KERNEL}": f"dummy initrd {DEBIAN_KERNEL}\n",
        "/grub/grub.cfg": grub_cfg,
    }
    root_files: dict[str, str | bytes] = {
        "/usr/lib/os-release": DEBIAN_OS_RELEASE,
        "/etc/hostname": "web01\n",
        "/etc/debian_version": "12.5\n",
        "/etc/machine-id": "0d15c0de0d15c0de0d15c0de0d15c0de\n",
        "/etc/fstab": fstab,
        "/etc/network/interfaces": NETWORK_INTERFACES,
        "/etc/passwd": GUEST_PASSWD,
        "/etc/shadow": GUEST_SHADOW,
        "/var/lib/dpkg/status": DPKG_STATUS,
        "/usr/bin/ls": ls_elf,
    }
    root_symlinks = {
        "/etc/os-release": "../usr/lib/os-release",
        "/bin": "usr/bin",
        "/sbin": "usr/sbin",
        "/lib": "usr/lib",
        "/lib64": "usr/lib64",
        "/etc/evil_abs": "/etc/shadow",
        "/etc/evil_rel": "../../../../../../../etc/passwd",
        "/root/escape_dir": "/",
    }
    var_files: dict[str, str | bytes] = {
        "/log/messages": VAR_LOG_MESSAGES,
        # Also here: with /var mounted, this is the copy a guest would really read.
        "/lib/dpkg/status": DPKG_STATUS,
    }
    home_files: dict[str, str | bytes] = {"/user/notes.txt": HOME_NOTES}

    root_src = work / "root"
    _write_tree(root_src, root_files, root_symlinks)
    for d in ("boot/efi", "home", "proc", "sys", "dev", "run", "tmp", "usr/sbin", "usr/lib64"):
        (root_src / d).mkdir(parents=True, exist_ok=True)
    (root_src / "usr/bin/ls").chmod(0o755)
    (root_src / "etc/shadow").chmod(0o640)
    boot_src, var_src, home_src = work / "boot", work / "var", work / "home"
    _write_tree(boot_src, boot_files, {})
    (boot_src / "efi").mkdir()  # where the ESP mounts, as on a real Debian /boot
    _write_tree(var_src, var_files, {})
    _write_tree(home_src, home_files, {})

    fs = {n: work / f"p{n}.img" for n in range(1, 7)}
    _mkfs_vfat(fs[1], sizes[1], labels[1], "1234ABCD", files=esp_files, fat=32)
    _mkfs_ext4(fs[2], sizes[2], labels[2], fs_uuid[2], boot_src)
    _mkfs_ext4(fs[3], sizes[3], labels[3], fs_uuid[3], root_src)
    _mkfs_xfs(fs[4], sizes[4], labels[4], fs_uuid[4], var_src)
    _mkfs_btrfs(fs[5], sizes[5], labels[5], fs_uuid[5], home_src)
    _mkswap(fs[6], sizes[6], labels[6], fs_uuid[6])

    types = {1: GPT_ESP, 6: GPT_LINUX_SWAP}
    parts = [
        _Part(sizes[n], types.get(n, GPT_LINUX_FS), fs[n], partnames[n], partuuid[n])
        for n in range(1, 7)
    ]
    disk = out / "linux-gpt.raw"
    layout = _assemble(disk, LINUX_DISK_SIZE_MIB, "gpt", _gpt_uuid(LINUX_ID, 0), parts)
    for n, info in layout.items():
        info.update(fstype=fs_types[n], label=labels[n], uuid=fs_uuid[n])

    per_fs_files = {1: esp_files, 2: boot_files, 3: root_files, 4: var_files, 5: home_files}
    guest_files: dict[str, str] = {}
    for n, files in per_fs_files.items():
        prefix = "" if mountpoints[n] == "/" else mountpoints[n]
        guest_files.update({prefix + p: c for p, c in _text_files(files).items()})
    notes: dict[str, Any] = {
        "table": "gpt",
        "disk_guid": _gpt_uuid(LINUX_ID, 0),
        "virtual_size": LINUX_DISK_SIZE_MIB * MiB,
        "partition_count": 6,
        "partitions": layout,
        "fs_types": fs_types,
        "labels": labels,
        "fs_uuids": fs_uuid,
        "partuuids": partuuid,
        "partnames": partnames,
        "mountpoints": mountpoints,
        "root_partition": 3,
        "files": {n: _text_files(files) for n, files in per_fs_files.items()},
        "guest_files": guest_files,
        "file_sha256": {"/usr/bin/ls": hashlib.sha256(ls_elf).hexdigest()},
        "elf_files": ["/usr/bin/ls"],
        "symlinks": root_symlinks,
        "escape_symlinks": {
            p: t for p, t in root_symlinks.items() if p.startswith(("/etc/evil", "/root/"))
        },
        "guest_markers": {
            "/etc/passwd": "GUEST-PASSWD-MARKER",
            "/etc/shadow": "GUEST-SHADOW-MARKER",
        },
        "os_release": _parse_os_release(DEBIAN_OS_RELEASE),
        "hostname": "web01",
        "debian_version": "12.5",
        "kernel_version": DEBIAN_KERNEL,
        "fstab": fstab,
        "installed_packages": {
            "base-files": "12.4+deb12u5",
            "openssh-server": "1:9.2p1-2+deb12u2",
            "linux-image-6.1.0-18-amd64": "6.1.76-1",
        },
        "config_files_only_packages": {"nano": "7.2-1"},
        "dpkg_status_on": {3: "/var/lib/dpkg/status", 4: "/lib/dpkg/status"},
    }
    return disk.name, "raw", notes


def linux_gpt_raw() -> BuiltImage:
    return _cached("linux-gpt-raw", _build_linux_gpt)


def _converted(name: str, fmt: str, suffix: str, options: list[str]) -> BuiltImage:
    # Resolved before _cached takes the lock: flock is per open file, so building
    # the raw image from inside this build would deadlock on our own lock.
    raw = linux_gpt_raw()

    def build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
        built = _convert(raw, out / f"linux-gpt.{suffix}", fmt, options)
        return Path(built.path).name, built.fmt, built.notes

    return _cached(name, build)


def linux_gpt_qcow2() -> BuiltImage:
    return _converted("linux-gpt-qcow2", "qcow2", "qcow2", [])


def linux_gpt_vmdk() -> BuiltImage:
    return _converted("linux-gpt-vmdk", "vmdk", "vmdk", [])


def linux_gpt_vhdx() -> BuiltImage:
    return _converted("linux-gpt-vhdx", "vhdx", "vhdx", [])


def linux_gpt_vpc() -> BuiltImage:
    # force_size keeps the exact raw size; CHS rounding would move the backup GPT.
    return _converted("linux-gpt-vpc", "vpc", "vhd", ["-o", "subformat=dynamic,force_size=on"])


# --------------------------------------------------------------------------- 3. MBR logical

MBR_ID = 3
MBR_DISK_ID = "0x5eedc0de"

ROCKY_OS_RELEASE = """\
NAME="Rocky Linux"
VERSION="9.3 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.3"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"
ANSI_COLOR="0;32"
CPE_NAME="cpe:/o:rocky:rocky:9::baseos"
HOME_URL="https://rockylinux.org/"
"""


def _build_mbr_logical(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    fstab = (
        "# /etc/fstab\n"
        "/dev/sda1 / ext4 defaults 1 1\n"
        "/dev/sda5 /data ext4 defaults 1 2\n"
        "proc /proc proc defaults 0 0\n"
    )
    root_files: dict[str, str | bytes] = {
        "/etc/os-release": ROCKY_OS_RELEASE,
        "/etc/rocky-release": "Rocky Linux release 9.3 (Blue Onyx)\n",
        "/etc/hostname": "db02\n",
        "/etc/fstab": fstab,
    }
    root_symlinks = {"/etc/redhat-release": "rocky-release", "/etc/system-release": "rocky-release"}
    l5_files: dict[str, str | bytes] = {"/id.txt": "logical5\n"}
    l6_files: dict[str, str | bytes] = {"/id.txt": "logical6\n"}
    fat_files: dict[str, str | bytes] = {"/README.TXT": "data partition on a logical vfat\n"}

    root_src, l5_src, l6_src = work / "root", work / "l5", work / "l6"
    _write_tree(root_src, root_files, root_symlinks)
    for d in ("var/lib/rpm", "data", "proc", "usr/bin"):
        (root_src / d).mkdir(parents=True, exist_ok=True)
    _write_tree(l5_src, l5_files, {})
    _write_tree(l6_src, l6_files, {})

    fs_uuid = {1: _fs_uuid(MBR_ID, 1), 5: _fs_uuid(MBR_ID, 5), 6: _fs_uuid(MBR_ID, 6)}
    fs_uuid[7] = "DA7A-0007"
    labels = {1: "mbr-root", 5: "logical5", 6: "logical6", 7: "DATA"}
    fs_types = {1: "ext4", 5: "ext4", 6: "ext4", 7: "vfat"}
    fs = {n: work / f"p{n}.img" for n in (1, 5, 6, 7)}
    _mkfs_ext4(fs[1], 48, labels[1], fs_uuid[1], root_src)
    _mkfs_ext4(fs[5], 16, labels[5], fs_uuid[5], l5_src)
    _mkfs_ext4(fs[6], 16, labels[6], fs_uuid[6], l6_src)
    _mkfs_vfat(fs[7], 16, labels[7], "DA7A0007", files=fat_files, fat=16)

    parts = [
        _Part(48, "83", fs[1], bootable=True),
        _Part(None, "5"),
        _Part(16, "83", fs[5]),
        _Part(16, "83", fs[6]),
        _Part(16, "e", fs[7]),
    ]
    disk = out / "mbr-logical.raw"
    size_mib = 104
    layout = _assemble(disk, size_mib, "dos", MBR_DISK_ID, parts)
    for n, info in layout.items():
        if n in fs_types:
            info.update(fstype=fs_types[n], label=labels[n], uuid=fs_uuid[n])
        info["partuuid"] = f"{MBR_DISK_ID[2:]}-{n:02d}"  # what blkid derives for MBR
    notes: dict[str, Any] = {
        "table": "dos",
        "disk_id": MBR_DISK_ID,
        "virtual_size": size_mib * MiB,
        "partition_count": 5,  # sfdisk lists the extended container too
        "partition_numbers": [1, 2, 5, 6, 7],
        "extended_partition": 2,
        "logical_partitions": [5, 6, 7],
        "partitions": layout,
        "fs_types": fs_types,
        "labels": labels,
        "fs_uuids": fs_uuid,
        "partuuids": {n: info["partuuid"] for n, info in layout.items()},
        "root_partition": 1,
        "files": {
            1: _text_files(root_files),
            5: _text_files(l5_files),
            6: _text_files(l6_files),
            7: _text_files(fat_files),
        },
        "symlinks": root_symlinks,
        "dirs": {1: ["/var/lib/rpm"]},
        "os_release": _parse_os_release(ROCKY_OS_RELEASE),
        "hostname": "db02",
        "fstab": fstab,
    }
    return disk.name, "raw", notes


def mbr_logical_raw() -> BuiltImage:
    return _cached("mbr-logical-raw", _build_mbr_logical)


# --------------------------------------------------------------------------- 4/5. ext4 journal

DIRTY_EXT4_ID = 4
BROKEN_EXT4_ID = 5
EXT4_FS_MIB = 32


def _dumpe2fs_header(fs: Path) -> str:
    # dumpe2fs exits 1 when it cannot read the journal superblock, yet prints the header.
    return commands.run(["dumpe2fs", "-h", str(fs)], timeout=60, ok_codes=(0, 1)).stdout


def _ext4_root_names(fs: Path) -> set[str]:
    out = commands.run(["debugfs", "-R", "ls -p /", str(fs)], timeout=60).stdout
    # `ls -p` lines look like /ino/mode/uid/gid/name/size/
    return {line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6}


def _make_dirty_ext4(fs: Path, label: str, uuid: str, work: Path) -> None:
    """Leave `fs` with a committed but un-checkpointed transaction holding AFTER_CRASH_PATH.

    The shutdown ioctl commits the journal and aborts it, but the committed
    metadata still sits dirty in the loop device's page cache and the umount
    writes it home, which would make the fs look clean. So the crash state is
    the backing file as it is between shutdown and umount: copy it then.
    """
    src = work / "ext4-src"
    _write_tree(src, {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT}, {})
    scratch = work / "ext4-live.img"
    mnt = work / "ext4-mnt"
    for _attempt in range(3):
        _mkfs_ext4(scratch, EXT4_FS_MIB, label, uuid, src)
        with _loop(scratch) as dev, _mounted(dev, mnt, "ext4", "rw") as root:
            _write_synced(root / AFTER_CRASH_PATH.lstrip("/"), AFTER_CRASH_TEXT)
            commands.run(["xfs_io", "-x", "-c", "shutdown -f", str(root)], timeout=60)
            _sparse_clone(scratch, fs)
        names = _ext4_root_names(fs)
        if "needs_recovery" in _dumpe2fs_header(fs) and AFTER_CRASH_PATH[1:] not in names:
            scratch.unlink()
            return
        # Writeback (a global sync, memory pressure) beat the copy; try again.
        fs.unlink()
    raise ImageBuildError("could not capture an ext4 with an un-replayed journal")


def _verify_replay(fs: Path, work: Path, fstype: str, skip_opts: str, replay_opts: str) -> None:
    """The after-crash file must appear only when the journal or log is replayed."""
    copy = work / f"{fstype}-verify.img"
    _sparse_clone(fs, copy)
    mnt = work / f"{fstype}-verify-mnt"
    try:
        with _loop(copy) as dev:
            with _mounted(dev, mnt, fstype, skip_opts) as root:
                if (root / AFTER_CRASH_PATH[1:]).exists():
                    raise ImageBuildError(f"{fstype}: after-crash file visible without replay")
            with _mounted(dev, mnt, fstype, replay_opts) as root:
                if (root / AFTER_CRASH_PATH[1:]).read_text() != AFTER_CRASH_TEXT:
                    raise ImageBuildError(f"{fstype}: replay did not bring back after-crash file")
    finally:
        copy.unlink()


def _build_dirty_ext4(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = _fs_uuid(DIRTY_EXT4_ID, 1)
    fs = work / "dirty.ext4"
    _make_dirty_ext4(fs, "dirty", uuid, work)
    _verify_replay(fs, work, "ext4", "ro,noload", "ro")
    disk = out / "dirty-ext4.raw"
    layout = _single_partition_gpt(disk, DIRTY_EXT4_ID, fs, EXT4_FS_MIB, "dirty")
    notes = _single_partition_notes(DIRTY_EXT4_ID, layout, "ext4", "dirty", uuid)
    notes |= {
        "needs_recovery": True,
        "files_before_replay": {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT},
        "files_only_after_replay": {AFTER_CRASH_PATH: AFTER_CRASH_TEXT},
        "replay_works": True,
    }
    return disk.name, "raw", notes


def dirty_ext4_raw() -> BuiltImage:
    return _cached("dirty-ext4-raw", _build_dirty_ext4)


def _corrupt_ext4_journal(fs: Path) -> list[int]:
    block_size = 0
    for line in _dumpe2fs_header(fs).splitlines():
        if line.startswith("Block size:"):
            block_size = int(line.split(":")[1])
    if not block_size:
        raise ImageBuildError("dumpe2fs gave no block size")
    script = "".join(f"bmap <8> {i}\n" for i in range(4))
    out = commands.run(["debugfs", "-f", "-", str(fs)], input_text=script, timeout=60).stdout
    # debugfs echoes each request ("debugfs: bmap <8> 0"); answers are bare numbers.
    blocks = [int(line) for line in out.splitlines() if line.strip().isdigit()]
    if len(blocks) != 4:
        raise ImageBuildError(f"could not map the journal's first blocks: {out!r}")
    # A journal superblock with a bad magic makes the kernel refuse to load the
    # journal at all; clobbering the following descriptor blocks too means no
    # tool can quietly salvage the transaction either.
    garbage = b"\xba\xdc\x0f\xfe" * (block_size // 4)
    with open(fs, "r+b") as fh:
        for block in blocks:
            fh.seek(block * block_size)
            fh.write(garbage)
    return blocks


def _verify_ext4_broken(fs: Path, work: Path) -> str:
    copy = work / "ext4-verify.img"
    _sparse_clone(fs, copy)
    mnt = work / "ext4-verify-mnt"
    try:
        with _loop(copy) as dev:
            complaint = _mount_fails(dev, mnt, "ext4", "ro")
            with _mounted(dev, mnt, "ext4", "ro,noload") as root:
                if (root / BEFORE_CRASH_PATH[1:]).read_text() != BEFORE_CRASH_TEXT:
                    raise ImageBuildError("ro,noload mount lacks the pre-crash file")
    finally:
        copy.unlink()
    return complaint


def _build_broken_ext4(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = _fs_uuid(BROKEN_EXT4_ID, 1)
    fs = work / "broken.ext4"
    _make_dirty_ext4(fs, "brokenjournal", uuid, work)
    blocks = _corrupt_ext4_journal(fs)
    complaint = _verify_ext4_broken(fs, work)
    disk = out / "broken-journal-ext4.raw"
    layout = _single_partition_gpt(disk, BROKEN_EXT4_ID, fs, EXT4_FS_MIB, "brokenjournal")
    notes = _single_partition_notes(BROKEN_EXT4_ID, layout, "ext4", "brokenjournal", uuid)
    notes |= {
        "needs_recovery": True,
        "replay_works": False,
        "mount_fails_with": "ro",
        "mount_works_with": "ro,noload",
        "mount_error": complaint,
        "corrupted_fs_blocks": blocks,
        "files_before_replay": {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT},
        "files_lost": [AFTER_CRASH_PATH],
    }
    return disk.name, "raw", notes


def broken_journal_ext4_raw() -> BuiltImage:
    return _cached("broken-journal-ext4-raw", _build_broken_ext4)


# --------------------------------------------------------------------------- 6/7. xfs log

DIRTY_XFS_ID = 6
BROKEN_XFS_ID = 7
XFS_FS_MIB = 300  # mkfs.xfs refuses anything smaller


def _xfs_log_state(fs: Path) -> str:
    out = commands.run(["xfs_logprint", "-t", str(fs)], timeout=60, check=False)
    for line in out.stdout.splitlines():
        if "state:" in line:
            return line.split("state:")[1].strip().strip("<>")
    return "UNREADABLE"


def _make_dirty_xfs(fs: Path, label: str, uuid: str, work: Path) -> None:
    """Leave `fs` with AFTER_CRASH_PATH only in its log.

    Unlike ext4, a shut-down XFS refuses all further metadata writes, so the
    unmount does not write the logged changes home.
    """
    src = work / "xfs-src"
    _write_tree(src, {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT}, {})
    mnt = work / "xfs-mnt"
    for _attempt in range(3):
        _mkfs_xfs(fs, XFS_FS_MIB, label, uuid, src)
        # nouuid: a test may have an image with this UUID mounted at the same time.
        with _loop(fs) as dev, _mounted(dev, mnt, "xfs", "rw,nouuid") as root:
            _write_synced(root / AFTER_CRASH_PATH.lstrip("/"), AFTER_CRASH_TEXT)
            commands.run(["xfs_io", "-x", "-c", "shutdown -f", str(root)], timeout=60)
        if _xfs_log_state(fs) == "DIRTY":
            return
        fs.unlink()
    raise ImageBuildError("could not leave an xfs with a dirty log")


def _build_dirty_xfs(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = _fs_uuid(DIRTY_XFS_ID, 1)
    fs = work / "dirty.xfs"
    _make_dirty_xfs(fs, "dirtyxfs", uuid, work)
    _verify_replay(fs, work, "xfs", "ro,norecovery,nouuid", "ro,nouuid")
    disk = out / "dirty-xfs.raw"
    layout = _single_partition_gpt(disk, DIRTY_XFS_ID, fs, XFS_FS_MIB, "dirtyxfs")
    notes = _single_partition_notes(DIRTY_XFS_ID, layout, "xfs", "dirtyxfs", uuid)
    notes |= {
        "log_state": "DIRTY",
        "files_before_replay": {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT},
        "files_only_after_replay": {AFTER_CRASH_PATH: AFTER_CRASH_TEXT},
        "replay_works": True,
    }
    return disk.name, "raw", notes


def dirty_xfs_raw() -> BuiltImage:
    return _cached("dirty-xfs-raw", _build_dirty_xfs)


def _corrupt_xfs_log(fs: Path) -> tuple[int, int]:
    """Overwrite the head of the internal log; returns (byte offset, length) clobbered."""
    sb = commands.run(
        ["xfs_db", "-r", "-c", "sb 0", "-c", "p logstart", str(fs)], timeout=60
    ).stdout
    logstart = int(sb.split("=")[1])
    conv = commands.run(
        ["xfs_db", "-r", "-c", f"convert fsb {logstart} daddr", str(fs)], timeout=60
    ).stdout
    # prints e.g. "0x4b030 (307248)"
    daddr = int(conv.split("(")[1].split(")")[0])
    offset = daddr * SECTOR
    # Garbage with a nonzero "cycle" in every sector: log head search then finds
    # no record header at all, which recovery treats as fatal. (Zeros would read
    # as a freshly made log and mount fine; a bad CRC at the head is trimmed away
    # as a torn write.)
    length = 64 * SECTOR
    with open(fs, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xde\xad\xbe\xef" * (length // 4))
    return offset, length


def _verify_xfs_broken(fs: Path, work: Path) -> str:
    copy = work / "xfs-verify.img"
    _sparse_clone(fs, copy)
    mnt = work / "xfs-verify-mnt"
    try:
        with _loop(copy) as dev:
            complaint = _mount_fails(dev, mnt, "xfs", "ro,nouuid")
            with _mounted(dev, mnt, "xfs", "ro,norecovery,nouuid") as root:
                if (root / BEFORE_CRASH_PATH[1:]).read_text() != BEFORE_CRASH_TEXT:
                    raise ImageBuildError("ro,norecovery mount lacks the pre-crash file")
    finally:
        copy.unlink()
    return complaint


def _build_broken_xfs(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    uuid = _fs_uuid(BROKEN_XFS_ID, 1)
    fs = work / "broken.xfs"
    _make_dirty_xfs(fs, "brokenlog", uuid, work)
    offset, length = _corrupt_xfs_log(fs)
    complaint = _verify_xfs_broken(fs, work)
    disk = out / "broken-log-xfs.raw"
    layout = _single_partition_gpt(disk, BROKEN_XFS_ID, fs, XFS_FS_MIB, "brokenlog")
    notes = _single_partition_notes(BROKEN_XFS_ID, layout, "xfs", "brokenlog", uuid)
    notes |= {
        "log_state": _xfs_log_state(fs),
        "replay_works": False,
        "mount_fails_with": "ro",
        "mount_works_with": "ro,norecovery",
        "mount_error": complaint,
        "corrupted_fs_range": [offset, length],
        "files_before_replay": {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT},
        "files_lost": [AFTER_CRASH_PATH],
    }
    return disk.name, "raw", notes


def broken_log_xfs_raw() -> BuiltImage:
    return _cached("broken-log-xfs-raw", _build_broken_xfs)


# --------------------------------------------------------------------------- 8. windows NTFS

WINDOWS_ID = 8
WINDOWS_DISK_ID = "0x5eed0008"
NTFS_SERIAL = "5EED0008C0FFEE08"
NTFS_FS_MIB = 64
# What the registry hives and cmd.exe of the sample Windows image say.
WINDOWS_FACTS: dict[str, Any] = {
    "product_name": "Windows Server 2019 Standard",
    "major": 10,
    "minor": 0,
    "build": "17763",
    "edition": "ServerStandard",
    "hostname": "WIN-APP01",
    "arch": "x86_64",
}
# Windows 10 / Server 2016 and later freeze CurrentVersion at 6.3 for old installers.
WINDOWS_CURRENT_VERSION = "6.3"
IMAGE_FILE_MACHINE_AMD64 = 0x8664
PE_OFFSET = 0x80


def _pe_stub(machine: int, text: bytes) -> bytes:
    """The headers of a PE executable: an MZ header whose e_lfanew (at 0x3c) points
    to "PE\\0\\0" and a COFF file header naming `machine`, followed by `text`.

    No sections and no optional header: enough for a header parser, not for a loader.
    """
    dos = bytearray(PE_OFFSET)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, PE_OFFSET)
    message = b"This program cannot be run in DOS mode.\r\r\n$"
    dos[0x4E : 0x4E + len(message)] = message
    # COFF header: machine, section count, timestamp, symbol table offset, symbol
    # count, optional header size, characteristics (EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE).
    coff = struct.pack("<HHIIIHH", machine, 0, 0, 0, 0, 0, 0x0022)
    return bytes(dos) + b"PE\0\0" + coff + text


def _windows_hives(work: Path) -> dict[str, bytes]:
    """Real registry hives (hivexsh -w on a hand-made empty hive) as {guest path: bytes}."""
    facts = WINDOWS_FACTS
    hive_dir = work / "hives"
    software = hive.make_software_hive(
        hive_dir / "SOFTWARE",
        product_name=facts["product_name"],
        major=facts["major"],
        minor=facts["minor"],
        build=facts["build"],
        current_version=WINDOWS_CURRENT_VERSION,
        edition=facts["edition"],
    )
    system = hive.make_system_hive(hive_dir / "SYSTEM", computer_name=facts["hostname"])
    ntuser = hive.make_hive(
        hive_dir / "NTUSER.DAT", {}, file_name="\\??\\C:\\Users\\Administrator\\ntuser.dat"
    )
    return {
        "/Windows/System32/config/SOFTWARE": software.read_bytes(),
        "/Windows/System32/config/SYSTEM": system.read_bytes(),
        "/Users/Administrator/NTUSER.DAT": ntuser.read_bytes(),
    }


def _build_windows_ntfs(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    cmd_exe = _pe_stub(IMAGE_FILE_MACHINE_AMD64, b"dummy cmd.exe for vmcraft tests\n")
    files: dict[str, str | bytes] = {
        "/Windows/System32/cmd.exe": cmd_exe,
        **_windows_hives(work),
        "/Windows/System32/drivers/etc/hosts": "127.0.0.1 localhost\r\n",
        "/Users/Administrator/Desktop/readme.txt": "Administrator desktop note\r\n",
        "/Program Files/Common Files/marker.txt": "program files marker\r\n",
    }
    dirs = ["/Program Files", "/Program Files (x86)", "/Users/Administrator", "/Windows/Temp"]
    fs = work / "p1.ntfs"
    _mkfs_ntfs(
        fs,
        NTFS_FS_MIB,
        "Windows",
        serial=NTFS_SERIAL,
        hidden_sectors=2048,
        files=files,
        dirs=dirs,
        work=work,
    )
    disk = out / "windows-ntfs.raw"
    size_mib = NTFS_FS_MIB + 2
    layout = _assemble(
        disk, size_mib, "dos", WINDOWS_DISK_ID, [_Part(NTFS_FS_MIB, "7", fs, bootable=True)]
    )
    layout[1].update(fstype="ntfs", label="Windows", uuid=NTFS_SERIAL)
    layout[1]["partuuid"] = f"{WINDOWS_DISK_ID[2:]}-01"
    notes: dict[str, Any] = {
        "table": "dos",
        "disk_id": WINDOWS_DISK_ID,
        "virtual_size": size_mib * MiB,
        "partition_count": 1,
        "partitions": layout,
        "fs_types": {1: "ntfs"},
        "labels": {1: "Windows"},
        "fs_uuids": {1: NTFS_SERIAL},
        "partuuids": {1: layout[1]["partuuid"]},
        "files": {1: _text_files(files)},
        "binary_files": {1: sorted(p for p, c in files.items() if isinstance(c, bytes))},
        "dirs": {1: dirs},
        "windows": dict(WINDOWS_FACTS),
    }
    return disk.name, "raw", notes


def windows_ntfs_raw() -> BuiltImage:
    return _cached("windows-ntfs-raw", _build_windows_ntfs)


# --------------------------------------------------------------------------- 9. twenty parts

TWENTY_ID = 9


def _build_twenty_parts(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    count, part_mib = 20, 8
    parts: list[_Part] = []
    labels, fs_uuids, files = {}, {}, {}
    for n in range(1, count + 1):
        src = work / f"src{n:02d}"
        content = f"{n}\n"
        _write_tree(src, {"/id.txt": content}, {})
        fs = work / f"p{n:02d}.img"
        labels[n] = f"p{n:02d}"
        fs_uuids[n] = _fs_uuid(TWENTY_ID, n)
        files[n] = {"/id.txt": content}
        _mkfs_ext4(fs, part_mib, labels[n], fs_uuids[n], src)
        parts.append(_Part(part_mib, GPT_LINUX_FS, fs, f"part{n:02d}", _gpt_uuid(TWENTY_ID, n)))
    disk = out / "twenty-parts.raw"
    size_mib = count * part_mib + 2
    layout = _assemble(disk, size_mib, "gpt", _gpt_uuid(TWENTY_ID, 0), parts)
    for n, info in layout.items():
        info.update(fstype="ext4", label=labels[n], uuid=fs_uuids[n])
    notes: dict[str, Any] = {
        "table": "gpt",
        "disk_guid": _gpt_uuid(TWENTY_ID, 0),
        "virtual_size": size_mib * MiB,
        "partition_count": count,
        "partitions": layout,
        "fs_types": dict.fromkeys(range(1, count + 1), "ext4"),
        "labels": labels,
        "fs_uuids": fs_uuids,
        "partuuids": {n: info["partuuid"] for n, info in layout.items()},
        "partnames": {n: info["name"] for n, info in layout.items()},
        "files": files,
    }
    return disk.name, "raw", notes


def twenty_parts_raw() -> BuiltImage:
    return _cached("twenty-parts-raw", _build_twenty_parts)


# --------------------------------------------------------------------------- 10. bad inputs


def _vmdk4_header() -> bytes:
    # A real VMDK sparse header layout (magic, version 1, valid-looking flags and
    # capacity) whose grain table size is absurd, so qemu refuses it while the
    # magic still says "VMDK".
    header = struct.pack(
        "<4sIIQQQQIQQQ?4sH",
        b"KDMV",  # magic
        1,  # version
        3,  # flags
        2048,  # capacity, sectors
        128,  # grain size, sectors
        1,  # descriptor offset
        20,  # descriptor size
        0xFFFFFFFF,  # grain table entries per table: far past qemu's limit
        0,  # redundant grain directory offset
        21,  # grain directory offset
        64,  # overhead
        False,  # unclean shutdown
        b"\n \r\n",  # line-ending check bytes
        0,  # compression
    )
    return header.ljust(SECTOR, b"\0") + b"\xaa" * (64 * SECTOR)


def _pseudo_random(length: int, seed: bytes) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < length:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:length])


def _qemu_img_error(path: Path, fmt: str | None) -> str:
    argv = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    result = commands.run([*argv, str(path)], timeout=60, check=False)
    if result.returncode == 0:
        raise ImageBuildError(f"qemu-img info accepted {path}")
    return result.stderr.strip()


def _build_corrupt_vmdk(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    path = out / "x.vmdk"
    path.write_bytes(_vmdk4_header())
    error = _qemu_img_error(path, "vmdk")
    return path.name, "vmdk", {"magic": "KDMV", "qemu_img_error": error}


def _build_text_vmdk(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    path = out / "notes.vmdk"
    path.write_text("These are meeting notes, not a disk image.\nSaved with a .vmdk name.\n")
    error = _qemu_img_error(path, "vmdk")
    return path.name, "vmdk", {"qemu_img_error": error}


def _build_missing_extent_vmdk(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    extent = "missing-flat.vmdk"
    descriptor = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        f'RW 2048 FLAT "{extent}" 0\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        'ddb.virtualHWVersion = "4"\n'
        'ddb.geometry.cylinders = "2"\n'
        'ddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.adapterType = "ide"\n'
    )
    path = out / "missing-extent.vmdk"
    path.write_text(descriptor)
    error = _qemu_img_error(path, "vmdk")
    return path.name, "vmdk", {"missing_extent": extent, "qemu_img_error": error}


def _build_not_an_image(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    path = out / "junk.bin"
    data = _pseudo_random(256 * 1024, b"vmcraft junk")
    path.write_bytes(data)
    return path.name, "raw", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def corrupt_vmdk() -> BuiltImage:
    return _cached("corrupt-vmdk", _build_corrupt_vmdk)


def text_vmdk() -> BuiltImage:
    return _cached("text-vmdk", _build_text_vmdk)


def missing_extent_vmdk() -> BuiltImage:
    return _cached("missing-extent-vmdk", _build_missing_extent_vmdk)


def not_an_image() -> BuiltImage:
    return _cached("not-an-image", _build_not_an_image)


ALL_IMAGES: dict[str, Callable[[], BuiltImage]] = {
    "linux_gpt_raw": linux_gpt_raw,
    "linux_gpt_qcow2": linux_gpt_qcow2,
    "linux_gpt_vmdk": linux_gpt_vmdk,
    "linux_gpt_vhdx": linux_gpt_vhdx,
    "linux_gpt_vpc": linux_gpt_vpc,
    "mbr_logical_raw": mbr_logical_raw,
    "dirty_ext4_raw": dirty_ext4_raw,
    "broken_journal_ext4_raw": broken_journal_ext4_raw,
    "dirty_xfs_raw": dirty_xfs_raw,
    "broken_log_xfs_raw": broken_log_xfs_raw,
    "windows_ntfs_raw": windows_ntfs_raw,
    "twenty_parts_raw": twenty_parts_raw,
    "corrupt_vmdk": corrupt_vmdk,
    "text_vmdk": text_vmdk,
    "missing_extent_vmdk": missing_extent_vmdk,
    "not_an_image": not_an_image,
}


def main() -> None:
    print(f"cache: {cache_dir()}")
    total = time.monotonic()
    for name, build in ALL_IMAGES.items():
        started = time.monotonic()
        built = build()
        print(f"{name:26s} {time.monotonic() - started:6.2f}s  {built.path}")
    print(f"total {time.monotonic() - total:.2f}s")


if __name__ == "__main__":
    try:
        main()
    except CommandError as exc:
        sys.exit(f"build failed: {exc}")
