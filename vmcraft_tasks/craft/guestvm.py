"""`GuestVM`: a VM attached as a whole, every disk and every LV, as one set of volumes.

with GuestVM(["web01-disk1.vmdk", "web01-disk2.vmdk"]) as vm:   # disk 1 boots
    vm.scan()                          # partitions of every disk, PVs, LVs, filesystems
    report = vm.inspect()              # OS roots on any volume, fstab resolved VM-wide

A thin facade over existing pieces: one `VMCraft` per disk (attach, partitions, blkid,
the mount ladder), `craft.lvm` (VG metadata read with a private lvm config restricted
to this VM's PV devices, LVs exposed without device-mapper) and `craft.volumes` (the
VM-wide numbering: the boot disk's partitions keep their numbers, disk k's partition p
is k*1000+p, LVs from 100000). Every LV that is not exposed carries its reason.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any

from vmcraft_tasks.craft import probe
from vmcraft_tasks.craft.cache import ScanCache
from vmcraft_tasks.craft.errors import NotLaunchedError, VMCraftError
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect_disk import WHOLE_DISK, find_roots, mountable
from vmcraft_tasks.craft.inspect_disk import scan as scan_disk
from vmcraft_tasks.craft.lvm import expose, layout, tools
from vmcraft_tasks.craft.lvm.expose import ExposedLV, PVLocation
from vmcraft_tasks.craft.mount import parallel
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.mount.tracker import MountTracker
from vmcraft_tasks.craft.nbd.select import make_backend
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft, mount_block_device
from vmcraft_tasks.craft.volumes import LVName, Volume, VolumeTable, disk_volume

log = logging.getLogger(__name__)

PV_TYPE = "LVM2_member"
LUKS_TYPE = "crypto_LUKS"


class GuestVMError(VMCraftError):
    """A disk of the VM could not be attached (the others were released)."""

    def __init__(self, disk: int, path: str, reason: str) -> None:
        self.disk = disk  # counted from 1, as people count disks
        self.path = path
        self.reason = reason
        super().__init__(f"disk {disk} of the VM ({path}): {reason}")


@dataclass(frozen=True)
class LVInfo:
    """One LV of the VM: its volume number, how it was exposed, or why it was not."""

    vg: str
    vg_uuid: str
    lv: str
    lv_uuid: str
    size: int
    volume: int
    method: str | None = None  # "loop" or "nbdkit"; None when not exposed
    device: str | None = None
    reason: str | None = None  # why it is not exposed; None when it is

    @property
    def name(self) -> str:
        return f"{self.vg}/{self.lv}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VMScan:
    """What `GuestVM.scan()` found, every number VM-wide."""

    volumes: VolumeTable
    disks: list[list[Partition]]  # each disk's own partition records, disk 0 first
    partitions: list[Partition]  # all of them renumbered VM-wide
    filesystems: list[Filesystem]  # disks' and LVs', `partition` is the volume number
    lvs: list[LVInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class VMReport:
    disks: list[dict[str, Any]]
    lvs: list[LVInfo]
    volumes: list[dict[str, Any]]
    filesystems: list[Filesystem]
    mounts: dict[int, MountResult]
    roots: list[OSInfo]
    notes: list[str]
    readonly: bool
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "disks": self.disks,
            "lvs": [lv.to_dict() for lv in self.lvs],
            "volumes": self.volumes,
            "filesystems": [f.to_dict() for f in self.filesystems],
            "mounts": {str(n): m.to_dict() for n, m in self.mounts.items()},
            "roots": [r.to_dict() for r in self.roots],
            "notes": self.notes,
            "readonly": self.readonly,
            "timings_ms": self.timings_ms,
        }


# --------------------------------------------------------------------------- pure helpers


def vm_filesystems(index: int, filesystems: Iterable[Filesystem]) -> list[Filesystem]:
    """Disk `index`'s filesystems with VM-wide volume numbers (the boot disk's unchanged)."""
    return [replace(fs, partition=disk_volume(index, fs.partition)) for fs in filesystems]


def lv_names(vgs: Iterable[layout.VG]) -> list[LVName]:
    """Every visible LV of `vgs` (exposable or not: each gets a volume number)."""
    return [LVName(vg=vg.name, lv=lv.name, vg_uuid=vg.uuid) for vg in vgs for lv in vg.lvs]


def lv_volume(table: VolumeTable, vg: layout.VG, lv: layout.LV) -> int:
    for volume in table.lvs_named(vg.name, lv.name):
        if volume.vg_uuid == vg.uuid:
            return volume.number
    raise KeyError(f"VG {vg.name} ({vg.uuid}): LV {lv.name} has no volume")


def no_root_reason(described: str, lvs: Iterable[LVInfo]) -> str:
    """Why no OS root was found, in words: what was scanned and every LV left out."""
    unexposed = [f"{lv.name}: {lv.reason}" for lv in lvs if lv.reason]
    text = f"no operating system root found on any volume ({described})"
    if unexposed:
        text += "; LVs not exposed: " + "; ".join(unexposed)
    return text


def describe_volumes(filesystems: Iterable[Filesystem], table: VolumeTable) -> str:
    parts = []
    for fs in filesystems:
        volume = table.get(fs.partition)
        label = volume.label if volume is not None else f"volume {fs.partition}"
        parts.append(f"{label}: {fs.type or fs.content or 'no filesystem'}")
    return "; ".join(parts) or "no volumes"


# --------------------------------------------------------------------------- the facade


class GuestVM:
    def __init__(
        self,
        paths: Sequence[str],
        *,
        readonly: bool = True,
        settings: CraftSettings | None = None,
        cache: ScanCache | None = None,
    ) -> None:
        if not paths:
            raise ValueError("a VM needs at least one disk")
        self.paths = [os.path.abspath(p) for p in paths]
        self.readonly = readonly
        self.settings = settings or CraftSettings()
        self.cache = cache
        self._disks: list[VMCraft] = []
        self._scan: VMScan | None = None
        self._exposed: dict[int, ExposedLV] = {}  # volume number -> exposed LV
        self._lv_tracker = MountTracker()
        self._parent: str | None = None  # the boot disk's attach state dir
        # nbdkit ends its service when the thread that started it exits (a parent-death
        # signal): LV helpers are started on this thread, which lives until shutdown().
        self._owner: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------

    def launch(self) -> GuestVM:
        """Attach every disk (disk 0 boots); on a failure the others are released."""
        if self._disks:
            return self
        attached: list[VMCraft] = []
        for index, path in enumerate(self.paths):
            g = VMCraft(path, readonly=self.readonly, settings=self.settings, cache=self.cache)
            try:
                g.launch()
            except (VMCraftError, OSError) as exc:
                for other in reversed(attached):
                    try:
                        other.shutdown()
                    except VMCraftError as release_exc:
                        log.warning("releasing %s: %s", other.path, release_exc)
                raise GuestVMError(index + 1, path, str(exc)) from exc
            attached.append(g)
        self._disks = attached
        self._parent = attached[0].disk.state_dir
        return self

    def shutdown(self) -> None:
        """Unmount everything, release the LVs, then detach every disk; safe twice.

        A failure on one step still runs the others; the first error is raised at the end.
        """
        if not self._disks:
            return
        errors: list[str] = []
        failed = self._lv_tracker.umount_all()
        errors += [f"could not unmount {mp}" for mp in failed]
        for g in self._disks:
            errors += [f"could not unmount {mp}" for mp in g.umount_all()]
        if self._parent is not None:
            try:
                expose.release_all(self._parent)
            except (VMCraftError, OSError) as exc:
                errors.append(f"releasing LVs: {exc}")
        # Later disks first: the boot disk's state dir holds every private mountpoint.
        for g in reversed(self._disks):
            try:
                g.shutdown()
            except (VMCraftError, OSError) as exc:
                errors.append(f"{g.path}: {exc}")
        if self._owner is not None:
            self._owner.shutdown(wait=True)
            self._owner = None
        self._disks = []
        self._exposed.clear()
        self._scan = None
        self._parent = None
        if errors:
            raise VMCraftError("; ".join(errors))

    def __enter__(self) -> GuestVM:
        return self.launch()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- facts -----------------------------------------------------------------

    @property
    def disks(self) -> list[VMCraft]:
        if not self._disks:
            raise NotLaunchedError()
        return list(self._disks)

    @property
    def boot_disk(self) -> VMCraft:
        return self.disks[0]

    @property
    def parent(self) -> str:
        """The boot disk's attach state dir: LV state and private mounts live under it."""
        if self._parent is None:
            raise NotLaunchedError()
        return self._parent

    # -- scanning --------------------------------------------------------------

    def scan(self) -> VMScan:
        """Partitions and filesystems of every disk, the VGs on their PVs, every
        exposable LV exposed and probed; cached until shutdown."""
        if self._scan is not None:
            return self._scan
        disks = self.disks
        per_disk: list[list[Partition]] = []
        filesystems: list[Filesystem] = []
        pv_devices: list[str] = []
        locations: dict[str, PVLocation] = {}  # PV device -> where its bytes are
        notes: list[str] = []
        for index, g in enumerate(disks):
            parts, found = scan_disk(g)
            per_disk.append(parts)
            by_number = {p.number: p for p in parts}
            for fs in found:
                if fs.type == PV_TYPE:
                    device, where = self._pv_device(g, by_number.get(fs.partition))
                    pv_devices.append(device)
                    locations[device] = where
                elif fs.type == LUKS_TYPE:
                    volume = Volume(disk_volume(index, fs.partition), disk=index, partition=0)
                    if fs.partition != WHOLE_DISK:
                        volume = replace(volume, partition=fs.partition)
                    notes.append(layout.luks_reason(volume.label))
            filesystems += vm_filesystems(index, found)
        vgs = layout.parse(tools.report(pv_devices)) if pv_devices else ()
        table = VolumeTable.build(per_disk, lv_names(vgs))
        if self._owner is None:
            self._owner = ThreadPoolExecutor(1, thread_name_prefix="guestvm-lvs")
        lvs = self._owner.submit(self._expose_all, vgs, table, locations).result()
        exposed = {lv.device: lv.volume for lv in lvs if lv.device}
        if exposed:
            for device, tags in probe.run_blkid(*exposed).items():
                filesystems.append(probe.filesystem_from_blkid(exposed[device], tags))
        for vg in vgs:
            for uuid in vg.missing_pvs:
                notes.append(f"VG {vg.name} ({vg.uuid}): PV {uuid} is missing")
        notes += [f"{lv.name}: {lv.reason}" for lv in lvs if lv.reason]
        self._scan = VMScan(
            volumes=table,
            disks=per_disk,
            partitions=table.vm_partitions(per_disk),
            filesystems=sorted(filesystems, key=lambda f: f.partition),
            lvs=lvs,
            notes=notes,
        )
        return self._scan

    def _pv_device(self, g: VMCraft, part: Partition | None) -> tuple[str, PVLocation]:
        """A block device lvm can read the PV from, and where its bytes are in the disk."""
        if part is not None:
            return g.device(part.number), PVLocation(g.disk_device, part.offset_bytes)
        # A whole-disk PV: lvm reads block devices only, and the FUSE disk is a file.
        if stat.S_ISBLK(os.stat(g.disk_device).st_mode):
            return g.disk_device, PVLocation(g.disk_device)
        size = g.image.virtual_size
        whole = Partition(WHOLE_DISK, 0, size // 512, 512, "", "none")
        # Recorded in the disk's attach state, so its shutdown releases it.
        device = make_backend(g.backend_name).partition_device(g.disk, whole)
        return device, PVLocation(g.disk_device)

    def _expose_all(
        self,
        vgs: Sequence[layout.VG],
        table: VolumeTable,
        locations: dict[str, PVLocation],
    ) -> list[LVInfo]:
        out = []
        for vg in vgs:
            where = {pv.uuid: locations[pv.device] for pv in vg.pvs if pv.device in locations}
            for lv in vg.lvs:
                info = LVInfo(
                    vg=vg.name,
                    vg_uuid=vg.uuid,
                    lv=lv.name,
                    lv_uuid=lv.uuid,
                    size=lv.size,
                    volume=lv_volume(table, vg, lv),
                    reason=lv.reason,
                )
                if lv.reason is None:
                    try:
                        e = expose.expose(
                            vg, lv, self.parent, locations=where, writable=not self.readonly
                        )
                    except (VMCraftError, OSError) as exc:
                        info = replace(info, reason=f"VG {vg.name}: LV {lv.name}: {exc}")
                    else:
                        self._exposed[info.volume] = e
                        info = replace(info, method=e.method, device=e.device)
                out.append(info)
        return out

    def filesystems(self) -> list[Filesystem]:
        """Every filesystem of the VM; `partition` is the volume number."""
        return list(self.scan().filesystems)

    def volumes(self) -> VolumeTable:
        return self.scan().volumes

    def lvs(self) -> list[LVInfo]:
        return list(self.scan().lvs)

    def lv_reasons(self) -> dict[str, str]:
        """{"vg/lv": why it is not exposed} for every LV that is not."""
        return {lv.name: lv.reason for lv in self.scan().lvs if lv.reason}

    def notes(self) -> list[str]:
        return list(self.scan().notes)

    # -- devices and mounts ------------------------------------------------------

    def _volume(self, number: int) -> Volume:
        volume = self.scan().volumes.get(number)
        if volume is None:
            raise VMCraftError(f"the VM has no volume {number}")
        return volume

    def device(self, volume: int) -> str:
        """The host block device (or disk file) of a volume."""
        v = self._volume(volume)
        if v.is_lv:
            exposed = self._exposed.get(volume)
            if exposed is None:
                reason = self.lv_reasons().get(f"{v.vg}/{v.lv}", "not exposed")
                raise VMCraftError(f"{v.label} has no device: {reason}")
            return exposed.device
        assert v.disk is not None and v.partition is not None
        g = self.disks[v.disk]
        return g.disk_device if v.partition == WHOLE_DISK else g.device(v.partition)

    def _fstype(self, volume: int) -> str | None:
        for fs in self.scan().filesystems:
            if fs.partition == volume:
                return fs.type
        return None

    def mount_with_fallback(
        self, volume: int, mountpoint: str, fstype: str | None = None
    ) -> MountResult:
        """The mount ladder for any volume: a disk's on its VMCraft, an LV's on its device."""
        try:
            v = self._volume(volume)
            fstype = fstype or self._fstype(volume)
            if not v.is_lv:
                assert v.disk is not None and v.partition is not None
                g = self.disks[v.disk]
                target: int | str = g.disk_device if v.partition == WHOLE_DISK else v.partition
                return g.mount_with_fallback(target, mountpoint, fstype)
            return mount_block_device(
                self.device(volume),
                mountpoint,
                fstype,
                readonly=self.readonly,
                tracker=self._lv_tracker,
            )
        except (VMCraftError, OSError) as exc:
            return MountResult(device=str(volume), mountpoint=mountpoint, ok=False, error=str(exc))

    def mount_all_parallel(
        self, volumes: Sequence[tuple[int, str]], max_workers: int = 4
    ) -> dict[str, MountResult]:
        """Mount `(volume, mountpoint)` pairs in parallel, parents first: {mountpoint: result}."""
        pairs = [(str(number), mp) for number, mp in volumes]

        def mount_one(number: str, mp: str) -> MountResult:
            return self.mount_with_fallback(int(number), mp)

        return parallel.mount_all_parallel(pairs, mount_one, max_workers=max_workers)

    def private_mountpoint(self, name: str) -> str:
        """A fresh directory in the boot disk's private attach state."""
        return self.boot_disk.private_mountpoint(name)

    def umount_all(self) -> list[str]:
        failed = self._lv_tracker.umount_all()
        for g in self._disks:
            failed += g.umount_all()
        return failed

    # -- inspection --------------------------------------------------------------

    def inspect(self, max_workers: int = 4) -> VMReport:
        """Scan, mount every filesystem of every volume privately, find OS roots and
        resolve their fstab across all volumes. Mounts stay until shutdown()."""
        t0 = time.perf_counter()
        found = self.scan()
        t1 = time.perf_counter()
        targets = [fs.partition for fs in found.filesystems if mountable(fs)]
        pairs = [(n, self.private_mountpoint(f"p{n}")) for n in targets]
        results = self.mount_all_parallel(pairs, max_workers=max_workers)
        mounts = {n: results[mp] for n, mp in pairs}
        t2 = time.perf_counter()
        roots = find_roots(
            self.boot_disk, found.partitions, found.filesystems, mounts, volumes=found.volumes
        )
        t3 = time.perf_counter()
        notes = list(found.notes)
        if not roots:
            described = describe_volumes(found.filesystems, found.volumes)
            notes.append(no_root_reason(described, found.lvs))
        return VMReport(
            disks=[self._disk_entry(i, g, found) for i, g in enumerate(self.disks)],
            lvs=list(found.lvs),
            volumes=self._volume_entries(found),
            filesystems=list(found.filesystems),
            mounts=mounts,
            roots=roots,
            notes=notes,
            readonly=self.readonly,
            timings_ms={
                "scan": round((t1 - t0) * 1000, 2),
                "mount": round((t2 - t1) * 1000, 2),
                "inspect": round((t3 - t2) * 1000, 2),
            },
        )

    @staticmethod
    def _disk_entry(index: int, g: VMCraft, found: VMScan) -> dict[str, Any]:
        return {
            "disk": index + 1,
            "path": g.image.path,
            "format": g.image.format,
            "virtual_size": g.image.virtual_size,
            "backend": g.backend_name,
            "attach_attempts": g.attach_attempts,
            "partitions": [p.to_dict() for p in found.disks[index]],
        }

    @staticmethod
    def _volume_entries(found: VMScan) -> list[dict[str, Any]]:
        by_number = {fs.partition: fs for fs in found.filesystems}
        out = []
        for v in found.volumes.volumes():
            fs = by_number.get(v.number)
            if v.partition == WHOLE_DISK and fs is None:
                continue  # a partitioned disk: its whole-disk volume holds no filesystem
            out.append(
                {
                    "number": v.number,
                    "label": v.label,
                    "type": fs.type if fs else None,
                    "uuid": fs.uuid if fs else None,
                    "fs_label": fs.label if fs else None,
                    "content": fs.content if fs else None,
                }
            )
        return out
