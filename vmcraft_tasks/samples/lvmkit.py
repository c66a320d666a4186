"""LVM volume groups for sample guests, made without device-mapper.

`lvcreate` needs device-mapper; these builds do not. For each PV a loop device is put
over its bytes in the disk file, `pvcreate --uuid` labels it, a hand-written metadata
text file (`vg_text`) is restored onto the PVs with `vgcfgrestore -f FILE VG`, and
`lvs --reportformat json -o lv_name,seg_start_pe,seg_pe_ranges,devices` reads the
segments back, checked against the spec. Filesystems are then written into the disk
files at their segments' offsets (`write_lv`): a filesystem made in a file is cut
into one slice per segment.

Every lvm call goes through `craft.lvm.tools` (a private config admitting only the
build's loop devices), so the host's LVM is never read or changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.lvm import tools
from vmcraft_tasks.samples import toolkit as tk

SECTOR = 512
EXTENT = 4 * tk.MiB
PE_START = tk.MiB  # lvm2's default first extent: 1 MiB into the PV
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def lvm_uuid(seed: str) -> str:
    """A fixed lvm2-style uuid (32 alphanumerics as 6-4-4-4-4-4-6) derived from `seed`."""
    digest = hashlib.sha256(seed.encode()).digest()
    chars = "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:32])
    cuts = (6, 4, 4, 4, 4, 4, 6)
    parts, pos = [], 0
    for n in cuts:
        parts.append(chars[pos : pos + n])
        pos += n
    return "-".join(parts)


@dataclass(frozen=True)
class PVSpec:
    """A PV: `size` bytes of `image` from byte `offset` (a partition, or the whole disk)."""

    key: str  # its name inside the metadata: pv0, pv1, ...
    uuid: str
    image: Path
    offset: int
    size: int

    @property
    def pe_count(self) -> int:
        return (self.size - PE_START) // EXTENT


@dataclass(frozen=True)
class SegSpec:
    extents: int
    pv: str  # PVSpec.key
    pv_start: int  # first extent on that PV


@dataclass(frozen=True)
class LVSpec:
    name: str
    uuid: str
    segments: tuple[SegSpec, ...] = ()
    # Hand-written segment blocks (thin pools, thin volumes): replace `segments`.
    raw_segments: tuple[str, ...] = ()
    visible: bool = True

    @property
    def extents(self) -> int:
        return sum(s.extents for s in self.segments)

    @property
    def size(self) -> int:
        return self.extents * EXTENT


def _segment_block(n: int, start: int, seg: SegSpec) -> str:
    return (
        f"\t\t\tsegment{n} {{\n"
        f"\t\t\t\tstart_extent = {start}\n"
        f"\t\t\t\textent_count = {seg.extents}\n"
        '\t\t\t\ttype = "striped"\n'
        "\t\t\t\tstripe_count = 1\n"
        f'\t\t\t\tstripes = ["{seg.pv}", {seg.pv_start}]\n'
        "\t\t\t}\n"
    )


def vg_text(
    name: str,
    uuid: str,
    pvs: Sequence[PVSpec],
    lvs: Sequence[LVSpec],
    devices: Mapping[str, str],
    *,
    host: str = "localhost",
) -> str:
    """lvm2's text metadata of one VG (what `vgcfgbackup` writes), for `vgcfgrestore`.

    `devices`: PV key -> the device it is on right now (a hint lvm records).
    """
    out = [
        'contents = "Text Format Volume Group"',
        "version = 1",
        'description = "vmcraft sample"',
        f'creation_host = "{host}"',
        "creation_time = 1700000000",
        "",
        f"{name} {{",
        f'\tid = "{uuid}"',
        "\tseqno = 1",
        '\tformat = "lvm2"',
        '\tstatus = ["RESIZEABLE", "READ", "WRITE"]',
        "\tflags = []",
        f"\textent_size = {EXTENT // SECTOR}",
        "\tmax_lv = 0",
        "\tmax_pv = 0",
        "\tmetadata_copies = 0",
        "",
        "\tphysical_volumes {",
    ]
    for pv in pvs:
        out += [
            f"\t\t{pv.key} {{",
            f'\t\t\tid = "{pv.uuid}"',
            f'\t\t\tdevice = "{devices[pv.key]}"',
            '\t\t\tstatus = ["ALLOCATABLE"]',
            "\t\t\tflags = []",
            f"\t\t\tdev_size = {pv.size // SECTOR}",
            f"\t\t\tpe_start = {PE_START // SECTOR}",
            f"\t\t\tpe_count = {pv.pe_count}",
            "\t\t}",
        ]
    out += ["\t}", "", "\tlogical_volumes {"]
    for lv in lvs:
        status = '["READ", "WRITE", "VISIBLE"]' if lv.visible else '["READ", "WRITE"]'
        blocks = list(lv.raw_segments)
        if not blocks:
            start = 0
            for n, seg in enumerate(lv.segments, 1):
                blocks.append(_segment_block(n, start, seg))
                start += seg.extents
        out += [
            f"\t\t{lv.name} {{",
            f'\t\t\tid = "{lv.uuid}"',
            f"\t\t\tstatus = {status}",
            "\t\t\tflags = []",
            "\t\t\tcreation_time = 1700000000",
            f'\t\t\tcreation_host = "{host}"',
            f"\t\t\tsegment_count = {len(blocks)}",
        ]
        out += [b.rstrip("\n") for b in blocks]
        out.append("\t\t}")
    out += ["\t}", "}", ""]
    return "\n".join(out)


_PE_RANGE = re.compile(r"^(?P<dev>[^:]+):(?P<first>\d+)-(?P<last>\d+)$")


def create_vg(
    name: str,
    uuid: str,
    pvs: Sequence[PVSpec],
    lvs: Sequence[LVSpec],
    work: Path,
    *,
    host: str = "localhost",
    force: bool = False,
) -> dict[str, Any]:
    """Label the PVs and restore the VG's metadata onto them; returns lvs' segment report.

    `force`: vgcfgrestore --force (lvm asks for it to restore thin volumes).
    The linear LVs' segments as lvs reads them back must match the spec.
    """
    with contextlib.ExitStack() as stack:
        loops = {
            pv.key: stack.enter_context(tk.loop(pv.image, offset=pv.offset, sizelimit=pv.size))
            for pv in pvs
        }
        devices = list(loops.values())
        for pv in pvs:
            tools.run_lvm(
                "pvcreate",
                [
                    "--uuid",
                    pv.uuid,
                    "--norestorefile",
                    "-ff",
                    "-y",
                    "--dataalignment",
                    "1m",
                    loops[pv.key],
                ],
                [loops[pv.key]],
                writable=True,
            )
        meta = work / f"{name}-{uuid[:6]}.vg"
        meta.write_text(vg_text(name, uuid, pvs, lvs, loops, host=host))
        args = ["-f", str(meta)] + (["--force"] if force else []) + [name]
        tools.run_lvm("vgcfgrestore", args, devices, writable=True)
        result = tools.run_lvm(
            "lvs",
            ["--reportformat", "json", "--all", "-o", "lv_name,seg_start_pe,seg_pe_ranges,devices"],
            devices,
        )
        report: dict[str, Any] = json.loads(result.stdout)
        _check_segments(report, lvs, loops)
        return report


def _check_segments(
    report: dict[str, Any], lvs: Sequence[LVSpec], loops: Mapping[str, str]
) -> None:
    pv_of_device = {dev: key for key, dev in loops.items()}
    found: dict[str, list[tuple[int, str, int, int]]] = {}
    for entry in report["report"]:
        for row in entry["lv"]:
            match = _PE_RANGE.match(row["seg_pe_ranges"])
            if match is None:
                continue
            found.setdefault(row["lv_name"].strip("[]"), []).append(
                (
                    int(row["seg_start_pe"]),
                    pv_of_device.get(match["dev"], match["dev"]),
                    int(match["first"]),
                    int(match["last"]),
                )
            )
    for lv in lvs:
        if lv.raw_segments:
            continue
        want, start = [], 0
        for seg in lv.segments:
            want.append((start, seg.pv, seg.pv_start, seg.pv_start + seg.extents - 1))
            start += seg.extents
        if sorted(found.get(lv.name, [])) != want:
            raise tk.ImageBuildError(
                f"LV {lv.name}: lvs reads back {sorted(found.get(lv.name, []))}, wanted {want}"
            )


def lv_offsets(lv: LVSpec, pvs: Sequence[PVSpec]) -> list[tuple[int, int, Path, int]]:
    """(LV byte offset, length, disk file, byte offset in it) of each segment of `lv`."""
    by_key = {pv.key: pv for pv in pvs}
    out, start = [], 0
    for seg in lv.segments:
        pv = by_key[seg.pv]
        length = seg.extents * EXTENT
        out.append((start, length, pv.image, pv.offset + PE_START + seg.pv_start * EXTENT))
        start += length
    return out


_ZERO = bytes(64 * 1024)


def copy_slice(src: Path, src_offset: int, length: int, dst: Path, dst_offset: int) -> None:
    """dd `length` bytes of src from src_offset into dst at dst_offset, skipping zeros."""
    chunk = len(_ZERO)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        fin.seek(src_offset)
        done = 0
        while done < length:
            data = fin.read(min(chunk, length - done))
            if not data:
                break
            if data != _ZERO[: len(data)]:
                fout.seek(dst_offset + done)
                fout.write(data)
            done += len(data)


def write_lv(lv: LVSpec, pvs: Sequence[PVSpec], fs_file: Path) -> None:
    """Write the filesystem image `fs_file` into `lv`'s segments, one slice each."""
    size = fs_file.stat().st_size
    if size > lv.size:
        raise tk.ImageBuildError(f"{fs_file} ({size}) overflows LV {lv.name} ({lv.size})")
    for start, length, image, offset in lv_offsets(lv, pvs):
        if start < size:
            copy_slice(fs_file, start, min(length, size - start), image, offset)


def ext4_blocks(fs_file: Path, guest_path: str) -> list[int]:
    """The physical 4 KiB blocks of a file in an ext4 image (debugfs `blocks`)."""
    out = commands.run(["debugfs", "-R", f"blocks {guest_path}", str(fs_file)], timeout=60).stdout
    return [int(b) for b in out.split()]


def patterned(size: int, tag: str) -> bytes:
    """`size` bytes of numbered, tagged lines: no zero chunk, quick to make, checkable."""
    line_len = 64
    lines = bytearray()
    n = 0
    while len(lines) < size:
        lines += f"{n:010d} {tag}".ljust(line_len - 1)[: line_len - 1].encode() + b"\n"
        n += 1
    return bytes(lines[:size])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_paths(built: tk.BuiltImage) -> list[str]:
    """All disk files of a multi-disk sample (`notes["disk_files"]`), in disk order."""
    folder = os.path.dirname(built.path)
    return [os.path.join(folder, name) for name in built.notes["disk_files"]]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
