"""`VMCraft`: the thin public facade over attach, scan, mount and inspect modules.

with VMCraft("web01.vmdk") as g:          # read-only: the source is never written
    parts = g.list_partitions()           # cached, keyed by disk identity
    g.mount_all_parallel([(p.device, f"/mnt/{p.number}") for p in parts])
    roots = g.inspect_os()
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from vmcraft_tasks.craft import cache as cache_mod
from vmcraft_tasks.craft import commands, images, mountinfo, partitions, probe
from vmcraft_tasks.craft.cache import CacheTTL, InProcessTTLCache, ScanCache
from vmcraft_tasks.craft.errors import (
    AttachError,
    CommandError,
    MountError,
    NotLaunchedError,
    PartitionError,
    PartitionLimitError,
    ReadOnlyError,
    TransientAttachError,
    VMCraftError,
)
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect_disk import DiskReport, inspect_disk
from vmcraft_tasks.craft.mount import ladder, parallel, tree
from vmcraft_tasks.craft.mount.host import kernel_filesystems
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.mount.plan import EXT_TYPES, default_options
from vmcraft_tasks.craft.mount.tracker import MountTracker, TrackedMount
from vmcraft_tasks.craft.nbd.base import AttachBackend, AttachedDisk
from vmcraft_tasks.craft.nbd.select import make_backend
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.retry import call_with_retry
from vmcraft_tasks.craft.settings import CraftSettings

log = logging.getLogger(__name__)

Device = str | int

_shared_cache = InProcessTTLCache()

# What qemu-nbd says when the image itself cannot be served (see launch()).
_QEMU_NBD_REFUSED_IMAGE = (
    "failed to blk_new_open",
    "could not create temporary overlay",
    "file too large",
)


def mount_block_device(
    dev: str,
    mountpoint: str,
    fstype: str | None,
    *,
    readonly: bool,
    tracker: MountTracker,
) -> MountResult:
    """The mount ladder on a host block device (a partition's, or an LV's), told whether
    an ext journal needs recovery and which filesystems the kernel has."""
    needs_recovery = fstype in EXT_TYPES and probe.ext_needs_recovery(dev)
    return ladder.mount_with_fallback(
        dev,
        mountpoint,
        fstype=fstype,
        readonly=readonly,
        kernel_filesystems=kernel_filesystems(),
        tracker=tracker,
        needs_recovery=needs_recovery,
    )


def shared_cache() -> InProcessTTLCache:
    """The process-wide default cache: a rescan of the same image in this process hits it."""
    return _shared_cache


class VMCraft:
    def __init__(
        self,
        path: str,
        *,
        readonly: bool = True,
        settings: CraftSettings | None = None,
        cache: ScanCache | None = None,
        backend: AttachBackend | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self.settings = settings or CraftSettings()
        self.cache: ScanCache = cache if cache is not None else shared_cache()
        self._backend = backend
        self._disk: AttachedDisk | None = None
        self._image: ImageInfo | None = None
        self._devices: dict[int, str] = {}
        self._devices_lock = threading.Lock()
        self._tracker = MountTracker()
        self._mount_root: str | None = None

    # -- lifecycle ---------------------------------------------------------------

    def launch(self, *, expected: ImageInfo | None = None, fmt: str | None = None) -> VMCraft:
        """Check and identify the image, then attach it, retrying transient failures.

        The image and every file it refers to are checked against this host's
        settings (image roots, size limit) before qemu sees any of it, and qemu-nbd is
        given the pinned graph of that check. `expected` is an earlier check of the
        same image (e.g. the conversion's output): a file changed since fails with
        ImageChangedError. `fmt` is the format when the caller knows it (an image it
        wrote), so the content cannot claim another one.
        """
        if self._disk is not None:
            return self
        image = images.probe_image(self.path, settings=self.settings, fmt=fmt, expected=expected)
        backend = self._backend or make_backend(self.settings.backend)
        os.makedirs(self.settings.work_dir, mode=0o700, exist_ok=True)

        def attempt(number: int) -> AttachedDisk:
            # Right before qemu-nbd opens the chain: still the files that were checked.
            image.verify_unchanged()
            state_dir = tempfile.mkdtemp(prefix="attach-", dir=self.settings.work_dir)
            try:
                return backend.attach(image, readonly=self.readonly, state_dir=state_dir)
            except TransientAttachError as exc:
                # qemu-nbd could not open the checked image (or build its overlay: a
                # 2 EiB disk needs an L1 table no file system holds): every retry
                # would fail the same way, so this is the image's fault, not the host's.
                if any(sign in exc.reason.lower() for sign in _QEMU_NBD_REFUSED_IMAGE):
                    raise AttachError(exc.image or image.path, exc.reason) from exc
                raise

        disk, attempts = call_with_retry(attempt, self.settings.retry)
        disk.attempts = attempts
        disk.save()
        self._backend, self._disk, self._image = backend, disk, image
        log.info(
            "attached %s (%s) via %s in %d attempt(s)",
            image.path,
            image.format,
            backend.name,
            attempts,
        )
        return self

    @classmethod
    def resume(
        cls,
        state_dir: str,
        *,
        settings: CraftSettings | None = None,
        cache: ScanCache | None = None,
    ) -> VMCraft:
        """Take over an attach made by another process of this host (a later task step).

        The disk, its partition devices and its private mounts are found from the
        attach's state directory; nothing is re-attached.
        """
        disk = AttachedDisk.load(state_dir)
        backend = make_backend(disk.backend)
        g = cls(disk.image.path, readonly=disk.readonly, settings=settings, cache=cache)
        g._backend, g._disk, g._image = backend, disk, disk.image
        g._devices.update(backend.known_partition_devices(disk))
        g._mount_root = os.path.join(state_dir, "mnt")
        for mountpoint, source in mountinfo.sources_under(g._mount_root).items():
            g._tracker.add(TrackedMount(source, mountpoint, "adopted"))
        return g

    def forget(self) -> None:
        """Drop this handle but leave the disk attached and mounted for a later step."""
        self._disk = None
        self._devices.clear()

    def shutdown(self) -> None:
        """Unmount everything, release devices and helpers; safe to call twice."""
        if self._disk is None or self._backend is None:
            return
        failed = self._tracker.umount_all()
        self._backend.release_partition_devices(self._disk)
        self._backend.detach(self._disk)
        state_dir = self._disk.state_dir
        if os.path.isdir(state_dir) and not mountinfo.mounts_under(state_dir):
            # The kernel backend leaves its pid file; nothing in here is mounted.
            shutil.rmtree(state_dir, ignore_errors=True)
        if self._mount_root:
            _remove_empty_tree(self._mount_root)
        self._disk = None
        self._devices.clear()
        if failed:
            raise MountError("", ", ".join(failed), "could not be unmounted")

    def __enter__(self) -> VMCraft:
        return self.launch()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- facts about the attach ------------------------------------------------

    @property
    def disk(self) -> AttachedDisk:
        if self._disk is None:
            raise NotLaunchedError()
        return self._disk

    @property
    def image(self) -> ImageInfo:
        if self._image is None:
            raise NotLaunchedError()
        return self._image

    @property
    def disk_device(self) -> str:
        """The whole-disk path (/dev/nbdN, or the FUSE file)."""
        return self.disk.disk_path

    @property
    def attach_attempts(self) -> int:
        return self.disk.attempts

    @property
    def backend_name(self) -> str:
        return self.disk.backend

    # -- cache settings and control ------------------------------------------

    @property
    def cache_ttl(self) -> CacheTTL:
        return self.settings.cache_ttl

    @property
    def partition_cache_ttl(self) -> float:
        return self.settings.cache_ttl.partitions_s

    @partition_cache_ttl.setter
    def partition_cache_ttl(self, seconds: float) -> None:
        self.settings.cache_ttl.partitions_s = seconds

    @property
    def blkid_cache_ttl(self) -> float:
        return self.settings.cache_ttl.blkid_s

    @blkid_cache_ttl.setter
    def blkid_cache_ttl(self, seconds: float) -> None:
        self.settings.cache_ttl.blkid_s = seconds

    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats()

    def _key(self, kind: str, detail: str = "") -> str:
        identity = self.image.identity
        return cache_mod.cache_key(identity, self.cache.generation(identity), kind, detail)

    def invalidate_partition_cache(self, device: Device | None = None) -> None:
        """Forget cached scans: of one partition, or (whole disk or None) of the whole disk."""
        number = None if device is None else self._partition_number(device)
        if number is None:
            self.cache.bump_generation(self.image.identity)
        else:
            self.cache.delete(self._blkid_key(number))

    # -- partitions ----------------------------------------------------------

    def list_partitions(self, use_cache: bool = True) -> list[Partition]:
        """Partition records of this disk, each with its block device on this host."""
        key = self._key(cache_mod.KIND_PARTITIONS)
        cached = self.cache.get(key, cache_mod.KIND_PARTITIONS) if use_cache else None
        if cached is not None:
            # The cache may be shared with hosts of other limits: this host's applies.
            self._check_partition_count(len(cached))
            return self._with_devices(cached)
        else:
            # Fresh results are stored either way: use_cache=False refreshes the cache.
            parts = partitions.read_partition_table(self.disk.disk_path)
            # Before a device exists for any of them: each partition costs a loop device.
            self._check_partition_count(len(parts))
            self.cache.set(key, [p.to_dict() for p in parts], self.cache_ttl.partitions_s)
        return [p.with_device(self._device_for(p)) for p in partitions.data_partitions(parts)]

    def _check_partition_count(self, count: int) -> None:
        limit = self.settings.max_partitions
        if count > limit:
            raise PartitionLimitError(
                self.path,
                f"the partition table defines {count} partitions, above the limit of "
                f"{limit} (VMCRAFT_MAX_PARTITIONS)",
            )

    def _with_devices(self, records: list[dict[str, Any]]) -> list[Partition]:
        """Cached records as partitions with this host's devices: the hot path of a cache
        hit builds each record once (devices already exposed need no lookup)."""
        with self._devices_lock:
            known = dict(self._devices)
        parts = []
        for record in records:
            device = known.get(record["number"])
            if device is not None:
                part = Partition(**record, device=device)
            else:
                part = Partition.from_dict(record)
                part = part.with_device(self._device_for(part)) if not part.extended else part
            if not part.extended:
                parts.append(part)
        return parts

    def _partition_by_number(self, number: int) -> Partition:
        for part in self.list_partitions():
            if part.number == number:
                return part
        raise PartitionError(f"{self.path}: no partition {number}")

    def _device_for(self, part: Partition) -> str:
        with self._devices_lock:
            device = self._devices.get(part.number)
            if device is None:
                assert self._backend is not None
                device = self._backend.partition_device(self.disk, part)
                self._devices[part.number] = device
            return device

    def _partition_number(self, device: Device) -> int | None:
        """Partition number for a device we handed out; None for the whole disk."""
        if isinstance(device, int):
            return device
        if device in (self.disk.disk_path, self.disk.nbd_device):
            return None
        with self._devices_lock:
            for number, dev in self._devices.items():
                if dev == device:
                    return number
        raise VMCraftError(f"{device} is not a device of this disk: use list_partitions()")

    def device(self, partition_number: int) -> str:
        with self._devices_lock:
            known = self._devices.get(partition_number)
        if known is not None:
            return known  # no partition-table lookup for a device already exposed
        return self._partition_by_number(partition_number).device or ""

    # -- blkid ---------------------------------------------------------------

    def blkid(self, device: Device, use_cache: bool = True) -> dict[str, str]:
        """blkid tags of a partition (TYPE, UUID, LABEL, PARTUUID, ...), cached."""
        number = self._partition_number(device)
        if number is None:
            return self._blkid_disk(use_cache)
        if use_cache:
            # The hot path: no partition-table lookup when the answer is cached.
            cached = self.cache.get(self._blkid_key(number), cache_mod.KIND_BLKID)
            if cached is not None:
                return dict(cached)
        return self._blkid_partitions([self._partition_by_number(number)], read_cache=False)[number]

    def _blkid_key(self, number: int) -> str:
        return self._key(cache_mod.KIND_BLKID, f"p{number}")

    def _blkid_disk(self, use_cache: bool) -> dict[str, str]:
        key = self._key(cache_mod.KIND_BLKID, "disk")
        cached = self.cache.get(key, cache_mod.KIND_BLKID) if use_cache else None
        if cached is not None:
            return dict(cached)
        tags = probe.run_blkid(self.disk.disk_path)[self.disk.disk_path]
        self.cache.set(key, tags, self.cache_ttl.blkid_s)
        return tags

    def _blkid_partitions(
        self, parts: list[Partition], *, read_cache: bool
    ) -> dict[int, dict[str, str]]:
        """Tags per partition number: cache hits first, then one blkid for all misses.

        Fresh results are always stored, so `use_cache=False` refreshes the cache.
        """
        tags: dict[int, dict[str, str]] = {}
        missing: dict[str, Partition] = {}
        for part in parts:
            key = self._blkid_key(part.number)
            cached = self.cache.get(key, cache_mod.KIND_BLKID) if read_cache else None
            if cached is not None:
                tags[part.number] = dict(cached)
            else:
                missing[self._device_for(part)] = part
        if missing:
            for device, found in probe.run_blkid(*missing).items():
                part = missing[device]
                # blkid -p on a loop device cannot see the partition table: add what it says.
                if part.uuid:
                    found.setdefault("PARTUUID", part.uuid)
                if part.name:
                    found.setdefault("PARTLABEL", part.name)
                if not found.get("TYPE"):
                    found[probe.CONTENT_TAG] = probe.describe_unidentified(
                        found, part.type_name, probe.read_head(device)
                    )
                self.cache.set(self._blkid_key(part.number), found, self.cache_ttl.blkid_s)
                tags[part.number] = found
        return tags

    def filesystems(self, use_cache: bool = True) -> list[Filesystem]:
        """blkid of every partition; all cache misses are probed by one blkid process."""
        parts = self.list_partitions(use_cache)
        tags = self._blkid_partitions(parts, read_cache=use_cache)
        return [
            probe.filesystem_from_blkid(p.number, tags[p.number], partuuid=p.uuid, partlabel=p.name)
            for p in parts
        ]

    def list_filesystems(self) -> dict[str, str]:
        """{device: type}, as libguestfs's list_filesystems ("unknown" when blkid found none)."""
        return {self.device(fs.partition): fs.type or "unknown" for fs in self.filesystems()}

    # -- partition table edits (write mode) ---------------------------------

    def _require_write(self, operation: str) -> None:
        if self.readonly:
            raise ReadOnlyError(operation)

    def _after_table_change(self) -> None:
        assert self._backend is not None
        self._tracker.umount_all()
        with self._devices_lock:
            self._devices.clear()
        self._backend.reread_partitions(self.disk)
        self.cache.bump_generation(self.image.identity)

    def part_init(self, device: Device, parttype: str) -> None:
        """Write an empty partition table ("gpt", or "mbr"/"msdos"/"dos")."""
        self._require_write("part_init")
        label = {"mbr": "dos", "msdos": "dos"}.get(parttype, parttype)
        if label not in ("gpt", "dos"):
            raise PartitionError(f"unsupported partition table type {parttype!r}")
        self._sfdisk([], f"label: {label}\n")

    def part_add(self, device: Device, prlogex: str, startsect: int, endsect: int) -> None:
        """Add a partition from `startsect` to `endsect` inclusive (-1: end of disk)."""
        self._require_write("part_add")
        if prlogex not in ("p", "primary", "l", "logical", "e", "extended"):
            raise PartitionError(f"prlogex must be primary, logical or extended, not {prlogex!r}")
        line = f"start={startsect}"
        if endsect >= 0:
            if endsect < startsect:
                raise PartitionError(f"end sector {endsect} is before start sector {startsect}")
            line += f", size={endsect - startsect + 1}"
        if prlogex.startswith("e"):
            line += ", type=Ex"
        self._sfdisk(["--append"], line + "\n")

    def part_del(self, device: Device, partnum: int) -> None:
        self._require_write("part_del")
        self._sfdisk(["--delete"], None, extra=[str(partnum)])

    def _sfdisk(self, flags: list[str], script: str | None, extra: Sequence[str] = ()) -> None:
        argv = [
            "sfdisk",
            "--no-reread",
            "--no-tell-kernel",
            "-q",
            *flags,
            self.disk.disk_path,
            *extra,
        ]
        try:
            commands.run(argv, input_text=script, timeout=60)
        except CommandError as exc:
            raise PartitionError(f"{self.path}: partition table change failed: {exc}") from exc
        finally:
            self._after_table_change()

    # -- mounting --------------------------------------------------------------

    def _fstype_of(self, device: Device) -> str | None:
        try:
            return self.blkid(device).get("TYPE")
        except CommandError:
            return None

    def mount(
        self, device: Device, mountpoint: str, options: str | None = None, fstype: str | None = None
    ) -> None:
        """One mount with this filesystem's default options; raises MountError on failure."""
        dev = self._block_device(device)
        fstype = fstype or self._fstype_of(device)
        opts = options or ",".join(default_options(fstype, self.readonly))
        os.makedirs(mountpoint, exist_ok=True)
        argv = ["mount", *(["-t", fstype] if fstype else []), "-o", opts, dev, mountpoint]
        try:
            commands.run(argv, timeout=ladder.MOUNT_TIMEOUT_S)
        except CommandError as exc:
            raise MountError(dev, mountpoint, exc.stderr_tail or str(exc)) from exc
        self._tracker.add(TrackedMount(dev, mountpoint, "kernel"))

    def _block_device(self, device: Device) -> str:
        number = self._partition_number(device)
        return self.disk.disk_path if number is None else self.device(number)

    def mount_with_fallback(
        self, device: Device, mountpoint: str, fstype: str | None = None
    ) -> MountResult:
        """Climb the fallback ladder; the result is truthy and names the rung that held."""
        try:
            dev = self._block_device(device)
            fstype = fstype or self._fstype_of(device)
            return mount_block_device(
                dev, mountpoint, fstype, readonly=self.readonly, tracker=self._tracker
            )
        except (VMCraftError, OSError) as exc:
            return MountResult(device=str(device), mountpoint=mountpoint, ok=False, error=str(exc))

    def mount_all_parallel(
        self, devices: Sequence[tuple[Device, str]], max_workers: int = 4
    ) -> dict[str, MountResult]:
        """Mount `(device, mountpoint)` pairs in parallel, parents before children."""
        pairs = [(str(d) if isinstance(d, int) else d, mp) for d, mp in devices]

        def mount_one(dev: str, mp: str) -> MountResult:
            return self.mount_with_fallback(int(dev) if dev.isdigit() else dev, mp)

        return parallel.mount_all_parallel(pairs, mount_one, max_workers=max_workers)

    def umount(self, mountpoint: str) -> None:
        self._tracker.umount(mountpoint)

    def umount_all(self) -> list[str]:
        """Unmount all our mounts, deepest first; returns any that would not unmount."""
        return self._tracker.umount_all()

    def mounts(self) -> list[TrackedMount]:
        return self._tracker.mounts()

    def private_mountpoint(self, name: str) -> str:
        """A fresh directory inside this attach's private state for a mount."""
        if self._mount_root is None:
            self._mount_root = os.path.join(self.disk.state_dir, "mnt")
        path = os.path.join(self._mount_root, name)
        os.makedirs(path, exist_ok=True)
        return path

    # -- inspection --------------------------------------------------------------

    def inspect(self, max_workers: int = 4) -> DiskReport:
        """Scan, mount every filesystem privately and inspect: the whole picture."""
        return inspect_disk(self, max_workers=max_workers)

    def inspect_os(self, max_workers: int = 4) -> list[OSInfo]:
        """The operating systems found on this disk, one per root filesystem."""
        return self.inspect(max_workers=max_workers).roots

    def mount_guest_tree(self, root: OSInfo, mounts: dict[int, MountResult]) -> list[str]:
        """Bind the guest's other filesystems inside its root mount where its fstab puts
        them (/boot, /var, ...), so the root mount shows the guest's whole tree.

        `mounts` are the private mounts made by `mount_all_parallel`/`inspect`;
        returns notes on fstab entries that could not be placed.
        """
        root_mount = mounts.get(root.root_partition)
        if root_mount is None or not root_mount.ok:
            raise VMCraftError(f"partition {root.root_partition} (the guest root) is not mounted")
        mounted = {n: m.mountpoint for n, m in mounts.items() if m.ok}
        binds, notes = tree.tree_mounts(root.fstab, mounted, root_partition=root.root_partition)
        return notes + tree.assemble(root_mount.mountpoint, binds, self._tracker)

    def guest(self, root: OSInfo | int) -> GuestFS:
        """Safe file access inside an inspected root: guest symlinks never reach the host."""
        number = root if isinstance(root, int) else root.root_partition
        mountpoint = os.path.join(self._mount_root or "", f"p{number}")
        if not self._tracker.is_tracked(mountpoint):
            raise VMCraftError(f"partition {number} is not mounted: call inspect_os() first")
        return GuestFS(mountpoint)


def _remove_empty_tree(path: str) -> None:
    for dirpath, _dirnames, _files in sorted(os.walk(path, topdown=False), reverse=True):
        try:
            os.rmdir(dirpath)
        except OSError:
            log.warning("left %s in place: not empty", dirpath)
