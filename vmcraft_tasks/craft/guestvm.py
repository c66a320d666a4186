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

import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any

from vmcraft_tasks.craft import probe
from vmcraft_tasks.craft.cache import ScanCache, cache_key
from vmcraft_tasks.craft.errors import NotLaunchedError, VMCraftError
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.craft.inspect_disk import WHOLE_DISK, find_roots, mountable
from vmcraft_tasks.craft.inspect_disk import scan as scan_disk
from vmcraft_tasks.craft.lvm import expose, layout, tools
from vmcraft_tasks.craft.lvm.expose import PVLocation
from vmcraft_tasks.craft.mount import parallel, tree
from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.mount.tracker import MountTracker
from vmcraft_tasks.craft.nbd.select import make_backend
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft, mount_block_device
from vmcraft_tasks.craft.vmstate import VMRecord, mark_member
from vmcraft_tasks.craft.volumes import LVName, Volume, VolumeTable, disk_volume

log = logging.getLogger(__name__)

PV_TYPE = "LVM2_member"
LUKS_TYPE = "crypto_LUKS"
# Scan cache kind of a VM's LVM layouts (keyed by every disk holding one of its PVs).
KIND_LVM = "lvm"


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LVInfo:
        return cls(**data)


@dataclass
class VMScan:
    """What `GuestVM.scan()` found, every number VM-wide."""

    volumes: VolumeTable
    disks: list[list[Partition]]  # each disk's own partition records, disk 0 first
    partitions: list[Partition]  # all of them renumbered VM-wide
    filesystems: list[Filesystem]  # disks' and LVs', `partition` is the volume number
    lvs: list[LVInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """What the VM record keeps (the volume table is rebuilt from it)."""
        return {
            "disks": [[p.to_dict() for p in parts] for parts in self.disks],
            "filesystems": [f.to_dict() for f in self.filesystems],
            "lvs": [lv.to_dict() for lv in self.lvs],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMScan:
        disks = [[Partition.from_dict(p) for p in parts] for parts in data["disks"]]
        lvs = [LVInfo.from_dict(lv) for lv in data["lvs"]]
        names = [LVName(vg=lv.vg, lv=lv.lv, vg_uuid=lv.vg_uuid) for lv in lvs]
        table = VolumeTable.build(disks, names)
        return cls(
            volumes=table,
            disks=disks,
            partitions=table.vm_partitions(disks),
            filesystems=[Filesystem.from_dict(f) for f in data["filesystems"]],
            lvs=lvs,
            notes=list(data["notes"]),
        )


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


def lvm_cache_key(pv_disks: Sequence[tuple[str, int]], pv_places: Sequence[tuple[int, int]]) -> str:
    """The scan cache key of a VM's LVM layout (pure): every disk holding one of its PVs
    (identity and generation, so an edit of any of them misses) and where on them the
    PVs are."""
    disks = "+".join(f"{identity}@g{generation}" for identity, generation in pv_disks)
    places = ",".join(f"{disk}.{part}" for disk, part in pv_places)
    return cache_key(f"vm[{disks}]", 0, KIND_LVM, places)


def _device_pattern(devices: Sequence[str]) -> re.Pattern[str]:
    # Longest first, and never a prefix of a longer name (/dev/loop1 in /dev/loop12).
    names = sorted(devices, key=len, reverse=True)
    return re.compile("|".join(re.escape(d) + r"(?![0-9A-Za-z])" for d in names))


def tokenize_devices(report: dict[str, Any], devices: Sequence[str]) -> dict[str, Any]:
    """`report` with this attach's PV device paths replaced by their positions (pure):
    device names are host-local and change with every attach."""
    if not devices:
        return report
    index = {d: i for i, d in enumerate(devices)}
    text = _device_pattern(devices).sub(lambda m: f"@pv{index[m.group(0)]}@", json.dumps(report))
    data: dict[str, Any] = json.loads(text)
    return data


def untokenize_devices(report: dict[str, Any], devices: Sequence[str]) -> dict[str, Any]:
    """The inverse of `tokenize_devices` for this attach's PV devices (pure)."""
    text = re.sub(r"@pv(\d+)@", lambda m: devices[int(m.group(1))], json.dumps(report))
    data: dict[str, Any] = json.loads(text)
    return data


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
        formats: Sequence[str | None] | None = None,
    ) -> None:
        if not paths:
            raise ValueError("a VM needs at least one disk")
        if formats is not None and len(formats) != len(paths):
            raise ValueError("one format (or None) per disk")
        self.paths = [os.path.abspath(p) for p in paths]
        self.readonly = readonly
        self.settings = settings or CraftSettings()
        self.cache = cache
        self.formats: list[str | None] = list(formats) if formats else [None] * len(paths)
        self._disks: list[VMCraft] = []
        self._scan: VMScan | None = None
        self._lv_tracker = MountTracker()
        self._parent: str | None = None  # the boot disk's attach state dir

    # -- lifecycle -------------------------------------------------------------

    def launch(self) -> GuestVM:
        """Attach every disk (disk 0 boots); on a failure the others are released."""
        if self._disks:
            return self
        attached: list[VMCraft] = []
        for index, path in enumerate(self.paths):
            g = VMCraft(path, readonly=self.readonly, settings=self.settings, cache=self.cache)
            try:
                g.launch(fmt=self.formats[index])
            except (VMCraftError, OSError) as exc:
                for other in reversed(attached):
                    try:
                        other.shutdown()
                    except VMCraftError as release_exc:
                        log.warning("releasing %s: %s", other.path, release_exc)
                raise GuestVMError(index + 1, path, str(exc)) from exc
            attached.append(g)
            if index == 0:
                # Recorded as each disk comes, so a crash mid-way still leaves the VM's
                # record to release from.
                self._parent = g.disk.state_dir
            else:
                mark_member(g.disk.state_dir, self.parent)
            self._disks = attached
            self._save()
        return self

    @classmethod
    def resume(
        cls,
        state_dir: str,
        *,
        settings: CraftSettings | None = None,
        cache: ScanCache | None = None,
    ) -> GuestVM:
        """Take over a VM attached by another process of this host (a later task step),
        from its boot disk's attach state directory; nothing is re-attached."""
        record = VMRecord.load(state_dir)
        dirs = record.disks if record is not None else [state_dir]
        disks = [VMCraft.resume(d, settings=settings, cache=cache) for d in dirs]
        vm = cls(
            [g.image.path for g in disks],
            readonly=disks[0].readonly,
            settings=settings,
            cache=cache,
            formats=[g.image.format for g in disks],
        )
        vm._disks = disks
        vm._parent = disks[0].disk.state_dir
        if record is not None and record.scan is not None:
            vm._scan = VMScan.from_dict(record.scan)
        return vm

    def forget(self) -> None:
        """Drop this handle but leave the VM attached, its LVs exposed and its
        filesystems mounted, for a later step."""
        for g in self._disks:
            g.forget()
        self._disks = []
        self._scan = None
        self._parent = None

    def _save(self) -> None:
        VMRecord(
            disks=[g.disk.state_dir for g in self._disks],
            readonly=self.readonly,
            scan=None if self._scan is None else self._scan.to_dict(),
            formats=[g.image.format for g in self._disks],
        ).save(self.parent)

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
        self._disks = []
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

    @property
    def state_dirs(self) -> list[str]:
        """Every disk's attach state directory, the boot disk's first."""
        return [g.disk.state_dir for g in self.disks]

    # -- scanning --------------------------------------------------------------

    def scan(self) -> VMScan:
        """Partitions and filesystems of every disk, the VGs on their PVs, every
        exposable LV exposed and probed; kept in the VM record until shutdown."""
        if self._scan is not None:
            return self._scan
        disks = self.disks
        per_disk: list[list[Partition]] = []
        filesystems: list[Filesystem] = []
        pv_devices: list[str] = []
        pv_places: list[tuple[int, int]] = []  # (disk, partition) of each PV
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
                    pv_places.append((index, fs.partition))
                    locations[device] = where
                elif fs.type == LUKS_TYPE:
                    volume = Volume(disk_volume(index, fs.partition), disk=index, partition=0)
                    if fs.partition != WHOLE_DISK:
                        volume = replace(volume, partition=fs.partition)
                    notes.append(layout.luks_reason(volume.label))
            filesystems += vm_filesystems(index, found)
        key = self._lvm_key(pv_places)
        cached = self._cached_lvm(key, pv_devices)
        report = cached["report"] if cached else (tools.report(pv_devices) if pv_devices else {})
        vgs = layout.parse(report) if pv_devices else ()
        table = VolumeTable.build(per_disk, lv_names(vgs))
        lvs = self._expose_all(vgs, table, locations)
        probes: dict[str, dict[str, str]] = dict(cached["lv_probes"]) if cached else {}
        exposed = {lv.device: lv for lv in lvs if lv.device}
        unprobed = [d for d, lv in exposed.items() if lv.lv_uuid not in probes]
        if unprobed:
            for device, tags in probe.run_blkid(*unprobed).items():
                probes[exposed[device].lv_uuid] = tags
        for lv in exposed.values():
            filesystems.append(probe.filesystem_from_blkid(lv.volume, probes.get(lv.lv_uuid, {})))
        if key is not None and not cached and self.cache is not None:
            value = {"report": tokenize_devices(report, pv_devices), "lv_probes": probes}
            self.cache.set(key, value, self.boot_disk.cache_ttl.for_kind(KIND_LVM))
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
        self._save()
        return self._scan

    def _lvm_key(self, pv_places: Sequence[tuple[int, int]]) -> str | None:
        if not pv_places or self.cache is None:
            return None
        pv_disks = sorted({d for d, _ in pv_places})
        identities = [self.disks[d].image.identity for d in pv_disks]
        return lvm_cache_key([(i, self.cache.generation(i)) for i in identities], sorted(pv_places))

    def _cached_lvm(self, key: str | None, pv_devices: Sequence[str]) -> dict[str, Any] | None:
        if key is None or self.cache is None:
            return None
        value = self.cache.get(key, KIND_LVM)
        if not isinstance(value, dict) or "report" not in value:
            return None
        return {
            "report": untokenize_devices(value["report"], pv_devices),
            "lv_probes": value.get("lv_probes") or {},
        }

    def invalidate_scan_cache(self) -> None:
        """Make every cached scan of this VM's disks unreachable (after writing to them)."""
        if self.cache is None:
            return
        for g in self.disks:
            self.cache.bump_generation(g.image.identity)

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
            lv = next((lv for lv in self.scan().lvs if lv.volume == volume), None)
            if lv is None or lv.device is None:
                reason = (lv.reason if lv else None) or "not exposed"
                raise VMCraftError(f"{v.label} has no device: {reason}")
            return lv.device
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

    def mount_guest_tree(self, root: OSInfo, mounts: dict[int, MountResult]) -> list[str]:
        """Bind the guest's other filesystems (on any disk or LV) inside its root mount
        where its fstab puts them, so the root mount shows the guest's whole tree.

        `root.fstab` must have been resolved with this VM's volumes (`inspect`, or
        `find_roots(..., volumes=...)`); returns notes on entries that could not be placed.
        """
        root_mount = mounts.get(root.root_partition)
        if root_mount is None or not root_mount.ok:
            label = self._volume(root.root_partition).label
            raise VMCraftError(f"{label} (the guest root) is not mounted")
        mounted = {n: m.mountpoint for n, m in mounts.items() if m.ok}
        binds, notes = tree.tree_mounts(root.fstab, mounted, root_partition=root.root_partition)
        return notes + tree.assemble(root_mount.mountpoint, binds, self._lv_tracker)

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

    def layout(self) -> dict[str, Any]:
        """The VM's disks, LVs, volumes and scan notes, as reports list them."""
        found = self.scan()
        return {
            "disks": [self._disk_entry(i, g, found) for i, g in enumerate(self.disks)],
            "lvs": [lv.to_dict() for lv in found.lvs],
            "volumes": self._volume_entries(found),
            "notes": list(found.notes),
        }

    def no_root_reason(self) -> str:
        """Why no OS root was found, naming every volume scanned and every LV left out."""
        found = self.scan()
        return no_root_reason(describe_volumes(found.filesystems, found.volumes), found.lvs)

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
