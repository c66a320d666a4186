"""The sample-image toolkit: a disk cache, filesystems made from staging trees, partition
tables, and the few mounts a build needs.

A recipe (vmcraft_tasks.samples.recipes.*) builds one image with these pieces: each
filesystem is made in its own sparse file (mkfs populating from a staging directory
wherever the tool can: `write_tree` + `mkfs_ext4(..., src)`), then `assemble` writes the
filesystems into a partitioned disk at their partitions' offsets and returns sfdisk's
view of the result. Only the crash states (vmcraft_tasks.samples.journals) and NTFS
need a mount; those mounts and loop devices are always undone in `finally` blocks.

`cached(name, build, sources=...)` runs a build once and keeps the result in
`$VMCRAFT_SAMPLES_DIR` (default /var/tmp/vmcraft-samples), under a short hash of the
shared builder modules (`SHARED_SOURCES`); the recipe's own sources are hashed into
the image's name, so editing one recipe rebuilds only its images. Builds hold a flock
and land atomically (temp dir, then rename), so concurrent pytest processes share one
build and never see a half-made image.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.atomicfile import locked

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
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_MSR = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"
GPT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"

Files = dict[str, str | bytes]  # guest path -> content (str is written as text)
Layout = dict[int, dict[str, Any]]  # partition number -> start, size, type, partuuid, ...


class ImageBuildError(RuntimeError):
    """A sample image could not be put into the state its notes promise."""


@dataclass(frozen=True)
class BuiltImage:
    path: str
    fmt: str
    # compare/hash off: a dict field would make the frozen dataclass unhashable.
    notes: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# A build writes its image into the out dir (first argument) using the scratch dir
# (second) and returns (file name, format, notes).
Builder = Callable[[Path, Path], tuple[str, str, dict[str, Any]]]

# --------------------------------------------------------------------------- cache

_HERE = Path(__file__).parent
# The modules every recipe builds with: editing one of them rebuilds every image.
SHARED_SOURCES = tuple(
    _HERE / name for name in ("toolkit.py", "journals.py", "windows.py", "hive.py")
)


def _digest(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for data in chunks:
        # Length-prefixed, so moving code from one source to another changes the hash.
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:12]


def builder_hash() -> str:
    return _digest(source.read_bytes() for source in SHARED_SOURCES)


def source_tag(*sources: str | os.PathLike[str] | object) -> str:
    """A short hash of source files (paths) or of objects' source (functions, classes)."""

    def text(source: object) -> bytes:
        if isinstance(source, str | os.PathLike):
            return Path(source).read_bytes()
        return inspect.getsource(source).encode()  # type: ignore[arg-type]

    return _digest(text(s) for s in sources)[:8]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ROOT_ENV, DEFAULT_CACHE_ROOT))


def cache_dir() -> Path:
    path = cache_root() / builder_hash()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _int_keys(obj: dict[str, Any]) -> dict[Any, Any]:
    # JSON turns partition-number keys into strings; undo that so cold and warm
    # runs hand tests identical notes.
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


def _load(final: Path) -> BuiltImage:
    manifest = json.loads((final / MANIFEST).read_text(), object_hook=_int_keys)
    return BuiltImage(str(final / manifest["file"]), manifest["fmt"], manifest["notes"])


def is_mounted_under(path: Path) -> bool:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4].startswith(prefix) for line in fh)


def remove_if_unmounted(path: Path) -> None:
    """rmtree `path` unless something is mounted inside it (rmtree would go through it)."""
    if path.exists() and not is_mounted_under(path):
        shutil.rmtree(path, ignore_errors=True)


def cached(name: str, build: Builder, *, sources: Iterable[object] = ()) -> BuiltImage:
    """Return image `name`, running `build(out_dir, work_dir)` first if it is not cached.

    `build` writes its image into out_dir and returns (file name, format, notes);
    work_dir is scratch space, deleted before the result is published. `sources`:
    files or objects whose source decides the image besides `SHARED_SOURCES` (the
    recipe's own module); their hash ends the cached name.
    """
    tags = tuple(sources)
    base = cache_dir()
    final = base / (f"{name}-{source_tag(*tags)}" if tags else name)
    if (final / MANIFEST).exists():
        return _load(final)
    with locked(str(base / ".lock"), mode=0o644):
        if (final / MANIFEST).exists():
            return _load(final)
        # Under the lock, so any temp dir is from a build that died; one that still
        # has something mounted inside is left alone rather than rmtree'd through.
        for stale in base.glob(".build-*"):
            remove_if_unmounted(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=base))
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
            remove_if_unmounted(tmp)
    return _load(final)


# --------------------------------------------------------------------------- files


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


def new_sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def filled(path: Path, size_mib: int, data: bytes) -> Path:
    """A partition image whose first bytes are `data` (the rest zeros, sparse)."""
    new_sparse_file(path, size_mib * MiB)
    with open(path, "r+b") as fh:
        fh.write(data)
    return path


_ZERO_CHUNK = bytes(64 * 1024)


def copy_sparse(src: Path, dst: Path, dst_offset: int = 0) -> None:
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


def sparse_clone(src: Path, dst: Path) -> None:
    new_sparse_file(dst, src.stat().st_size)
    copy_sparse(src, dst)


def write_tree(root: Path, files: Files, symlinks: dict[str, str] | None = None) -> Path:
    """Write `files` and `symlinks` (guest path -> target) under `root`; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    for rel, target in (symlinks or {}).items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return root


def text_files(files: Files) -> dict[str, str]:
    return {path: content for path, content in files.items() if isinstance(content, str)}


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def pseudo_random(length: int, seed: bytes) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < length:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:length])


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value.strip('"')
    return out


def gpt_uuid(image_id: int, n: int) -> str:
    """A fixed, readable GPT GUID: n=0 names the disk, n>0 partition n."""
    return f"5eed{image_id:04x}-0000-4000-8000-{n:012x}"


def fs_uuid(image_id: int, n: int) -> str:
    """A fixed, readable filesystem UUID for partition n of image `image_id`."""
    return f"f5{image_id:06x}-0000-4000-8000-{n:012x}"


def qemu_img_error(path: Path, fmt: str | None) -> str:
    """What `qemu-img info` says when it refuses `path` (ImageBuildError if it accepts it)."""
    argv = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    result = commands.run([*argv, str(path)], timeout=60, check=False)
    if result.returncode == 0:
        raise ImageBuildError(f"qemu-img info accepted {path}")
    return result.stderr.strip()


# --------------------------------------------------------------------------- filesystems


def mkfs_ext4(path: Path, size_mib: int, label: str, uuid: str, src: Path | None = None) -> None:
    """An ext4 of `size_mib` in a new sparse file, populated from `src` (mkfs -d)."""
    new_sparse_file(path, size_mib * MiB)
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-U", uuid]
    argv += ["-E", "root_owner=0:0"]
    if src is not None:
        argv += ["-d", str(src)]
    commands.run([*argv, str(path)], timeout=MKFS_TIMEOUT_S)


def xfs_proto(src: Path) -> str:
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


def mkfs_xfs(path: Path, size_mib: int, label: str, uuid: str, src: Path | None = None) -> None:
    """An xfs (300 MiB at least: mkfs.xfs refuses less), populated from a prototype of `src`."""
    new_sparse_file(path, size_mib * MiB)
    argv = ["mkfs.xfs", "-q", "-f", "-L", label, "-m", f"uuid={uuid}"]
    if src is not None:
        proto = path.with_name(path.name + ".proto")
        proto.write_text(xfs_proto(src))
        argv += ["-p", str(proto)]
    commands.run([*argv, str(path)], timeout=MKFS_TIMEOUT_S)


def mkfs_btrfs(path: Path, size_mib: int, label: str, uuid: str, src: Path) -> None:
    new_sparse_file(path, size_mib * MiB)
    commands.run(
        ["mkfs.btrfs", "-q", "-f", "-L", label, "-U", uuid, "--rootdir", str(src), str(path)],
        timeout=MKFS_TIMEOUT_S,
    )


def mkswap(path: Path, size_mib: int, label: str, uuid: str) -> None:
    new_sparse_file(path, size_mib * MiB)
    commands.run(["mkswap", "-L", label, "-U", uuid, str(path)], timeout=MKFS_TIMEOUT_S)


def _mtools_env() -> dict[str, str]:
    # Skip mtools' geometry sanity check, which rejects plain image files.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def mkfs_vfat(
    path: Path, size_mib: int, label: str, volume_id: str, *, files: Files, fat: int
) -> None:
    """A FAT`fat` filesystem holding `files`, written with mtools (no mount)."""
    new_sparse_file(path, size_mib * MiB)
    commands.run(
        ["mkfs.vfat", "-F", str(fat), "-n", label, "-i", volume_id, str(path)],
        timeout=MKFS_TIMEOUT_S,
    )
    staging = write_tree(path.with_name(path.name + ".d"), files)
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
def loop(path: Path, *, offset: int | None = None, sizelimit: int | None = None) -> Iterator[str]:
    """A loop device over `path` (or over `sizelimit` bytes at `offset`), detached after."""
    argv = ["losetup", "--show", "-f"]
    if offset is not None:
        argv += ["--offset", str(offset)]
    if sizelimit is not None:
        argv += ["--sizelimit", str(sizelimit)]
    device = commands.run([*argv, str(path)], timeout=MOUNT_TIMEOUT_S).stdout.strip()
    try:
        yield device
    finally:
        commands.run(["losetup", "-d", device], timeout=MOUNT_TIMEOUT_S)


@contextlib.contextmanager
def mounted(source: str, mnt: Path, fstype: str, options: str | None = None) -> Iterator[Path]:
    """`source` mounted at `mnt` (made if missing), unmounted after."""
    mnt.mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", fstype]
    if options is not None:
        argv += ["-o", options]
    commands.run([*argv, source, str(mnt)], timeout=MOUNT_TIMEOUT_S)
    try:
        yield mnt
    finally:
        commands.run(["umount", str(mnt)], timeout=MOUNT_TIMEOUT_S)


def mount_fails(dev: str, mnt: Path, fstype: str, options: str) -> str:
    """Check that mounting fails; returns mount's complaint (ImageBuildError if it works)."""
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


def _wait_for_mount(mnt: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
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


def mkfs_ntfs(
    path: Path,
    size_mib: int,
    label: str,
    *,
    serial: str,
    hidden_sectors: int,
    files: Files,
    dirs: list[str],
    work: Path,
) -> None:
    """An NTFS holding `files` and `dirs`, written through an ntfs-3g mount in `work`.

    `hidden_sectors`: the partition's start sector, which NTFS records in its boot sector.
    """
    new_sparse_file(path, size_mib * MiB)
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
            write_tree(mnt, files)
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
class Part:
    """One partition of a disk to assemble, in sfdisk's terms."""

    size_mib: int | None  # None: the rest of the disk (MBR extended container)
    type: str  # GPT type GUID or MBR type byte (hex)
    fs_file: Path | None = None  # a filesystem image copied to the partition
    name: str | None = None  # GPT partition name
    partuuid: str | None = None  # GPT partition GUID
    bootable: bool = False  # MBR active flag


def sfdisk_script(table: str, disk_id: str, parts: list[Part]) -> str:
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


def partition_table(disk: Path) -> dict[int, dict[str, Any]]:
    """sfdisk -J's partition entries of `disk`, keyed by partition number."""
    table = json.loads(commands.run(["sfdisk", "-J", str(disk)], timeout=60).stdout)
    table_json = table["partitiontable"]
    return {
        int(entry["node"][len(table_json["device"]) :]): entry for entry in table_json["partitions"]
    }


def assemble(disk: Path, size_mib: int, table: str, disk_id: str, parts: list[Part]) -> Layout:
    """Partition a new sparse disk and copy each filesystem file to its partition.

    Partition numbers follow sfdisk: for MBR the list is p1.., then the extended
    container, then logical partitions which sfdisk numbers from 5.
    Returns sfdisk's own view of the result, keyed by partition number.
    """
    new_sparse_file(disk, size_mib * MiB)
    commands.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
        input_text=sfdisk_script(table, disk_id, parts),
        timeout=MKFS_TIMEOUT_S,
    )
    found = partition_table(disk)
    if len(found) != len(parts):
        raise ImageBuildError(f"sfdisk made {len(found)} partitions, wanted {len(parts)}")
    result: Layout = {}
    for number, part in zip(sorted(found), parts, strict=True):
        entry = found[number]
        start = int(entry["start"]) * SECTOR
        size = int(entry["size"]) * SECTOR
        if part.fs_file is not None:
            fs_size = part.fs_file.stat().st_size
            if fs_size > size:
                raise ImageBuildError(f"{part.fs_file} ({fs_size}) overflows partition {number}")
            copy_sparse(part.fs_file, disk, start)
        info: dict[str, Any] = {"start": start, "size": size, "type": entry["type"]}
        if "uuid" in entry:
            info["partuuid"] = entry["uuid"].lower()  # blkid's spelling, as fstab uses
        for key in ("name", "bootable"):
            if key in entry:
                info[key] = entry[key]
        result[number] = info
    return result


def single_partition_gpt(
    disk: Path, image_id: int, fs_file: Path, fs_mib: int, name: str
) -> Layout:
    """A GPT disk holding one Linux partition, `fs_file`, with room for both GPT headers."""
    part = Part(fs_mib, GPT_LINUX_FS, fs_file, name, gpt_uuid(image_id, 1))
    return assemble(disk, fs_mib + 2, "gpt", gpt_uuid(image_id, 0), [part])


def single_partition_notes(
    image_id: int, layout: Layout, fstype: str, label: str, uuid: str
) -> dict[str, Any]:
    """The notes of a `single_partition_gpt` disk (fills in partition 1's filesystem)."""
    layout[1].update(fstype=fstype, label=label, uuid=uuid)
    end = layout[1]["start"] + layout[1]["size"]
    return {
        "table": "gpt",
        "disk_guid": gpt_uuid(image_id, 0),
        "virtual_size": end + MiB,
        "partition_count": 1,
        "partitions": layout,
        "fs_types": {1: fstype},
        "labels": {1: label},
        "fs_uuids": {1: uuid},
        "partuuids": {1: layout[1]["partuuid"]},
    }


def convert(src: BuiltImage, out: Path, fmt: str, options: list[str]) -> BuiltImage:
    """`src` (raw) converted to `fmt` at `out`; notes as src's plus converted_from."""
    commands.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, src.path, str(out)],
        timeout=CONVERT_TIMEOUT_S,
    )
    return BuiltImage(str(out), fmt, {**src.notes, "converted_from": "raw"})
