"""VG layouts parsed from lvm2's JSON reports (pure).

`parse(reports)` reads the three reports of `craft.lvm.tools.report` (`pvs`,
`lvs --segments`, `pvs --segments`, all `--reportformat json --units b --nosuffix`)
into frozen dataclasses. Every LV gets either no `reason` (it can be exposed as a
block device in userspace) or a reason saying why not; nothing is left out silently.
VGs are told apart by uuid, never by name: two guests may both have a VG `rl`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

UNKNOWN_DEVICE = "[unknown]"
# Segment types a userspace extent map can serve: linear extents of one PV each.
LINEAR_SEGTYPES = frozenset({"linear", "striped"})


@dataclass(frozen=True)
class Segment:
    """One LV segment: `extent_count` extents from LV extent `start_extent`, stored on
    PV `pv_uuid` from its extent `pv_start_extent` (extents of the VG's extent size)."""

    start_extent: int
    extent_count: int
    segtype: str
    pv_uuid: str | None  # None: not stored on a PV directly (thin, pool, raid, ...)
    pv_device: str | None  # None: the PV is missing, or no PV
    pv_start_extent: int = 0
    stripes: int = 1


@dataclass(frozen=True)
class PV:
    uuid: str
    device: str | None  # None when missing
    pe_start: int  # bytes from the PV device's start to its first extent
    pe_count: int
    size: int  # bytes
    missing: bool = False


@dataclass(frozen=True)
class LV:
    name: str
    uuid: str
    size: int  # bytes
    attr: str
    segtype: str  # "linear" when every segment is linear, else the first other type
    segments: tuple[Segment, ...]
    layout: str = ""
    role: str = ""
    pool_lv: str = ""
    origin: str = ""
    hidden: bool = False  # an internal LV of a pool, mirror, raid or cache ([name])
    reason: str | None = None  # why it cannot be exposed; None: it can

    @property
    def exposable(self) -> bool:
        return self.reason is None

    @property
    def multi_segment(self) -> bool:
        """True when more than one segment or more than one PV holds it (the NBD path)."""
        return len(self.segments) != 1


@dataclass(frozen=True)
class VG:
    name: str
    uuid: str
    extent_size: int  # bytes
    pvs: tuple[PV, ...]
    lvs: tuple[LV, ...]  # visible LVs, sorted by name
    internal_lvs: tuple[LV, ...] = field(default=())  # hidden component LVs

    @property
    def missing_pvs(self) -> tuple[str, ...]:
        """uuids of the PVs the metadata names but no admitted device holds."""
        return tuple(pv.uuid for pv in self.pvs if pv.missing)

    def pv(self, uuid: str) -> PV:
        for pv in self.pvs:
            if pv.uuid == uuid:
                return pv
        raise KeyError(f"VG {self.name} ({self.uuid}) has no PV {uuid}")

    def lv(self, name: str) -> LV:
        for lv in (*self.lvs, *self.internal_lvs):
            if lv.name == name:
                return lv
        raise KeyError(f"VG {self.name} ({self.uuid}) has no LV {name}")

    def mapper_name(self, lv: LV) -> str:
        """The guest's /dev/mapper name of `lv` (dashes doubled), as its fstab names it."""
        return f"{self.name.replace('-', '--')}-{lv.name.replace('-', '--')}"


def luks_reason(name: str) -> str:
    """The reason for a LUKS volume (an LV or a partition) named `name`."""
    return (
        f"{name} is LUKS-encrypted: opening it needs the LUKS passphrase "
        "(options.luks_keys, not supported yet)"
    )


def missing_pv_reason(vg_name: str, pv_uuid: str, lv_name: str) -> str:
    return (
        f"VG {vg_name}: PV {pv_uuid} is missing (a disk left out of the manifest?); "
        f"LV {lv_name} has a segment on it"
    )


# --------------------------------------------------------------------------- parsing


def _rows(report: Mapping[str, Any], key: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for entry in report.get("report", []):
        rows.extend(entry.get(key, []))
    return rows


def _int(value: str | None) -> int:
    return int(value) if value not in (None, "") else 0


def _plain_name(name: str) -> tuple[str, bool]:
    """lvs shows hidden LVs as `[name]`: (name, hidden)."""
    if name.startswith("[") and name.endswith("]"):
        return name[1:-1], True
    return name, False


def _lv_reason(
    vg_name: str,
    *,
    name: str,
    attr: str,
    segtypes: list[str],
    segments: list[Segment],
    pool_lv: str,
    origin: str,
    missing: Mapping[str, bool],
    hidden: bool,
) -> str | None:
    who = f"VG {vg_name}: LV {name}"
    kinds = set(segtypes)
    volume_type = attr[:1]
    if hidden:
        return f"{who} is an internal component LV (not a filesystem of its own)"
    if "thin-pool" in kinds:
        return f"{who} is a thin pool: it holds thin volumes, not a filesystem"
    if "thin" in kinds:
        return (
            f"{who} is a thin volume in pool {pool_lv or '?'}: thin provisioning needs "
            "the kernel's dm-thin; not supported in userspace"
        )
    if kinds & {"cache", "cache-pool", "writecache"}:
        return (
            f"{who} is a cached LV ({', '.join(sorted(kinds))}): dm-cache needs the kernel; "
            "not supported in userspace"
        )
    if any(k.startswith(("raid", "mirror")) for k in kinds):
        return f"{who} is a RAID/mirror LV ({', '.join(sorted(kinds))}): not supported in userspace"
    if volume_type in ("s", "S") or origin:
        return (
            f"{who} is a snapshot of {origin or '?'}: copy-on-write snapshots need the "
            "kernel's dm-snapshot; not supported in userspace"
        )
    if kinds - LINEAR_SEGTYPES:
        others = ", ".join(sorted(kinds - LINEAR_SEGTYPES))
        return f"{who} has segments of type {others}: not supported"
    for seg in segments:
        if seg.pv_uuid is not None and missing.get(seg.pv_uuid, False):
            return missing_pv_reason(vg_name, seg.pv_uuid, name)
    for seg in segments:
        if seg.pv_uuid is None:
            return f"{who}: a segment's PV is unknown"
        if seg.stripes != 1:
            return f"{who} is striped over {seg.stripes} PVs: not supported yet"
    if not segments:
        return f"{who} has no segments"
    return None


def parse(reports: Mapping[str, Mapping[str, Any]]) -> tuple[VG, ...]:
    """The VGs of `craft.lvm.tools.report`'s output, sorted by (name, uuid)."""
    pv_rows = _rows(reports["pvs"], "pv")
    seg_rows = _rows(reports["lvs"], "seg")
    pvseg_rows = _rows(reports["pvsegs"], "pvseg")

    vg_names: dict[str, str] = {}
    extent_sizes: dict[str, int] = {}
    pvs: dict[str, list[PV]] = {}
    for row in pv_rows:
        vg_uuid = row.get("vg_uuid", "")
        if not vg_uuid:
            continue  # an orphan PV: in no VG
        vg_names[vg_uuid] = row["vg_name"]
        extent_sizes[vg_uuid] = _int(row.get("vg_extent_size"))
        missing = row.get("pv_missing", "") == "missing" or row["pv_name"] == UNKNOWN_DEVICE
        pvs.setdefault(vg_uuid, []).append(
            PV(
                uuid=row["pv_uuid"],
                device=None if missing else row["pv_name"],
                pe_start=_int(row.get("pe_start")),
                pe_count=_int(row.get("pv_pe_count")),
                size=_int(row.get("pv_size")),
                missing=missing,
            )
        )

    # (lv uuid, LV start extent) -> the PV segments holding it
    placed: dict[tuple[str, int], list[dict[str, str]]] = {}
    for row in pvseg_rows:
        if row.get("lv_uuid"):
            placed.setdefault((row["lv_uuid"], _int(row.get("seg_start_pe"))), []).append(row)

    lv_rows: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in seg_rows:
        vg_uuid = row["vg_uuid"]
        vg_names.setdefault(vg_uuid, row["vg_name"])
        extent_sizes.setdefault(vg_uuid, _int(row.get("vg_extent_size")))
        lv_rows.setdefault((vg_uuid, row["lv_uuid"]), []).append(row)

    lvs: dict[str, list[LV]] = {}
    for (vg_uuid, lv_uuid), rows in lv_rows.items():
        rows.sort(key=lambda r: _int(r.get("seg_start_pe")))
        first = rows[0]
        name, hidden = _plain_name(first["lv_name"])
        pv_by_uuid = {pv.uuid: pv for pv in pvs.get(vg_uuid, [])}
        segments = [
            _segment(row, placed.get((lv_uuid, _int(row.get("seg_start_pe"))), []), pv_by_uuid)
            for row in rows
        ]
        segtypes = [row.get("segtype", "") for row in rows]
        other = [t for t in segtypes if t not in LINEAR_SEGTYPES]
        attr = first.get("lv_attr", "")
        pool_lv = _plain_name(first.get("pool_lv", ""))[0]
        origin = _plain_name(first.get("origin", ""))[0]
        reason = _lv_reason(
            vg_names[vg_uuid],
            name=name,
            attr=attr,
            segtypes=segtypes,
            segments=segments,
            pool_lv=pool_lv,
            origin=origin,
            missing={uuid: pv.missing for uuid, pv in pv_by_uuid.items()},
            hidden=hidden,
        )
        lv = LV(
            name=name,
            uuid=lv_uuid,
            size=_int(first.get("lv_size")),
            attr=attr,
            segtype=other[0] if other else "linear",
            segments=tuple(segments),
            layout=first.get("lv_layout", ""),
            role=first.get("lv_role", ""),
            pool_lv=pool_lv,
            origin=origin,
            hidden=hidden,
            reason=reason,
        )
        lvs.setdefault(vg_uuid, []).append(lv)

    vgs = []
    for vg_uuid, vg_name in vg_names.items():
        all_lvs = sorted(lvs.get(vg_uuid, []), key=lambda lv: lv.name)
        vgs.append(
            VG(
                name=vg_name,
                uuid=vg_uuid,
                extent_size=extent_sizes.get(vg_uuid, 0),
                pvs=tuple(sorted(pvs.get(vg_uuid, []), key=lambda pv: pv.uuid)),
                lvs=tuple(lv for lv in all_lvs if not lv.hidden),
                internal_lvs=tuple(lv for lv in all_lvs if lv.hidden),
            )
        )
    return tuple(sorted(vgs, key=lambda vg: (vg.name, vg.uuid)))


def _segment(
    row: Mapping[str, str], placed: Iterable[Mapping[str, str]], pvs: Mapping[str, PV]
) -> Segment:
    on_pvs = [p for p in placed if p.get("segtype", row.get("segtype")) != "free"]
    stripes = max(_int(row.get("stripes")), 1)
    if not on_pvs:
        return Segment(
            start_extent=_int(row.get("seg_start_pe")),
            extent_count=_int(row.get("seg_size_pe")),
            segtype=row.get("segtype", ""),
            pv_uuid=None,
            pv_device=None,
            stripes=stripes,
        )
    first = on_pvs[0]
    pv = pvs.get(first["pv_uuid"])
    return Segment(
        start_extent=_int(row.get("seg_start_pe")),
        extent_count=_int(row.get("seg_size_pe")),
        segtype=row.get("segtype", ""),
        pv_uuid=first["pv_uuid"],
        pv_device=pv.device if pv is not None else None,
        pv_start_extent=_int(first.get("pvseg_start")),
        stripes=max(stripes, len(on_pvs)),
    )
