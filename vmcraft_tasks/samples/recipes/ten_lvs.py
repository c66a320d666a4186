"""Rocky Linux 9 with ten LVs, as a hardened (CIS-style) install lays it out: GPT with a
BIOS boot partition, /boot (ext4) and one PV holding VG `rl` with `root`, `home`, `var`,
`var_log`, `var_log_audit`, `var_tmp`, `tmp`, `opt`, `srv` and `usr_local`, every one
carrying a filesystem named by its /dev/mapper path in fstab: the LVM counterpart of
`ten_parts_ubuntu` (ten filesystems of the same sizes, except the xfs ones: mkfs.xfs
makes nothing under 300 MiB).

Eight LVs are one segment each (a loop device); `root` and `home` were extended after the
others were made, so each has a second segment at the end of the PV (nbdkit), and a
file whose blocks lie in it (checked with debugfs at build time). `var` holds a 64 MiB
data file in one extent; the notes say where it lies in the LV (`var_data`), so a
reader can read data rather than holes (bench/lvm.py does). Every xfs is checked with
`xfs_repair -n`: a file larger than an allocation group (75 MiB here) comes out of
mkfs.xfs 6.1's prototype copy with a hole and a bad AGF checksum.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.samples import lvm_guests, lvmkit
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.lvmkit import EXTENT, PE_START, LVSpec, PVSpec, SegSpec
from vmcraft_tasks.samples.toolkit import BuiltImage

NAME = "ten-lvs"
IMAGE_ID = 0x1500
HOSTNAME = "rocky-tenlv05"
BOOT_MIB = 32
CMDLINE = "root=/dev/mapper/rl-root ro rd.lvm.lv=rl/root"
LATER = {"root": "/usr/share/vmcraft/later-segment.dat", "home": "/rocky/big/extended.dat"}
LATER_MIB = {"root": 24, "home": 12}
VAR_DATA = "/lib/mysql/ibdata1"
VAR_DATA_MIB = 64


@dataclass(frozen=True)
class DataLV:
    name: str
    mountpoint: str
    fstype: str  # "ext4" or "xfs"
    files: tk.Files


def _lvs() -> list[DataLV]:
    """The ten LVs, in volume order; root's tree is added by `_build`."""
    tag = f"{HOSTNAME} vmcraft marker"
    return [
        DataLV("root", "/", "ext4", {"/root/marker.txt": f"{HOSTNAME} root marker\n"}),
        DataLV("home", "/home", "ext4", {"/rocky/notes.txt": f"{HOSTNAME} home notes\n"}),
        DataLV(
            "var",
            "/var",
            "xfs",
            {"/lib/rpm/.marker": "rpm db lives in /usr/lib/sysimage/rpm on el9\n"},
        ),
        DataLV(
            "var_log",
            "/var/log",
            "ext4",
            {"/messages": f"Dec  1 12:00:00 {HOSTNAME} kernel: {tag}: var_log LV\n"},
        ),
        DataLV(
            "var_log_audit",
            "/var/log/audit",
            "ext4",
            {"/audit.log": f"type=DAEMON_START msg=audit(1700000000.000:1): {tag}\n"},
        ),
        DataLV("var_tmp", "/var/tmp", "ext4", {"/.vmcraft": f"{tag}: var_tmp LV\n"}),
        DataLV("tmp", "/tmp", "ext4", {"/.vmcraft": f"{tag}: tmp LV\n"}),
        DataLV("opt", "/opt", "ext4", {"/app/bin/run.sh": "#!/bin/sh\nexec /opt/app/bin/app\n"}),
        DataLV("srv", "/srv", "xfs", {"/www/index.html": f"<h1>{HOSTNAME} srv</h1>\n"}),
        DataLV(
            "usr_local",
            "/usr/local",
            "ext4",
            {"/bin/backup.sh": "#!/bin/sh\ntar czf /srv/b.tgz /etc\n"},
        ),
    ]


# Extents (4 MiB) in the order the installer and a later `lvextend` took them from the
# PV: every LV once, then root and home grown at the end.
ALLOCATION = (
    ("root", 4),
    ("var", 75),
    ("tmp", 4),
    ("opt", 4),
    ("srv", 75),
    ("var_log", 4),
    ("var_log_audit", 4),
    ("var_tmp", 4),
    ("usr_local", 4),
    ("home", 2),
    ("root", 12),
    ("home", 4),
)
PV_EXTENTS = sum(n for _, n in ALLOCATION)


def allocate(order: tuple[tuple[str, int], ...]) -> dict[str, tuple[SegSpec, ...]]:
    """Each LV's segments on pv0 when extents are handed out in `order` (pure)."""
    segments: dict[str, list[SegSpec]] = {}
    pos = 0
    for name, extents in order:
        segments.setdefault(name, []).append(SegSpec(extents, "pv0", pos))
        pos += extents
    return {name: tuple(segs) for name, segs in segments.items()}


def mounted_above(lv: DataLV, lvs: list[DataLV]) -> DataLV:
    """The LV whose filesystem holds `lv`'s mountpoint (pure): the longest prefix."""
    holders = [
        p
        for p in lvs
        if p is not lv and (p.mountpoint == "/" or lv.mountpoint.startswith(p.mountpoint + "/"))
    ]
    return max(holders, key=lambda p: len(p.mountpoint))


def fstab(boot_uuid: str, lvs: list[DataLV]) -> str:
    lines = ["# /etc/fstab", "# Created by anaconda"]
    for lv in lvs:
        device = f"/dev/mapper/rl-{lv.name}"
        passno = "0 0" if lv.fstype == "xfs" else ("1 1" if lv.mountpoint == "/" else "1 2")
        lines.append(f"{device:<31} {lv.mountpoint:<15} {lv.fstype:<7} defaults        {passno}")
        if lv.mountpoint == "/":
            lines.append(f"UUID={boot_uuid} /boot           ext4    defaults        1 2")
    return "\n".join(lines) + "\n"


def check_xfs(image: Path) -> None:
    result = commands.run(["xfs_repair", "-n", "-f", str(image)], timeout=120, check=False)
    if result.returncode != 0:
        raise tk.ImageBuildError(f"{image}: xfs_repair -n: {result.stderr.strip()[-400:]}")


_BMAP = re.compile(r"startblock \d+ \((?P<ag>\d+)/(?P<agbno>\d+)\) count (?P<count>\d+)")


def xfs_extent(image: Path, guest_path: str) -> tuple[int, int]:
    """(byte offset in the filesystem, length) of a one-extent file of an xfs image."""
    argv = ["xfs_db", "-r", "-c", f"path {guest_path}", "-c", "bmap", "-c", "sb 0"]
    out = commands.run([*argv, "-c", "p agblocks blocksize", str(image)], timeout=60).stdout
    extents = list(_BMAP.finditer(out))
    fields = dict(re.findall(r"^(agblocks|blocksize) = (\d+)$", out, re.MULTILINE))
    if len(extents) != 1 or set(fields) != {"agblocks", "blocksize"}:
        raise tk.ImageBuildError(f"{image}: {guest_path} is not one extent: {out!r}")
    ext, block = extents[0], int(fields["blocksize"])
    start = (int(ext["ag"]) * int(fields["agblocks"]) + int(ext["agbno"])) * block
    return start, int(ext["count"]) * block


def _root_tree(
    boot_uuid: str, machine_id: str, lvs: list[DataLV]
) -> tuple[tk.Files, dict[str, str]]:
    files, links = lvm_guests.rocky_root_files(HOSTNAME, fstab(boot_uuid, lvs), CMDLINE)
    files["/etc/machine-id"] = machine_id + "\n"
    files["/etc/hosts"] = f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n"
    files["/etc/passwd"] = (
        "root:x:0:0:root:/root:/bin/bash\nrocky:x:1000:1000::/home/rocky:/bin/bash\n"
    )
    files["/etc/group"] = "root:x:0:\nrocky:x:1000:\n"
    files["/usr/bin/bash"] = Path("/usr/bin/true").read_bytes()
    return files, links


def _build(out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    lvs = _lvs()
    seed = f"{NAME}-{IMAGE_ID}"
    u = {k: lvmkit.lvm_uuid(f"{seed}-{k}") for k in ("vg", "pv0", *(lv.name for lv in lvs))}
    segments = allocate(ALLOCATION)
    specs = {lv.name: LVSpec(lv.name, u[lv.name], segments[lv.name]) for lv in lvs}
    boot_uuid = tk.fs_uuid(IMAGE_ID, 2)
    fs_uuids = {lv.name: tk.fs_uuid(IMAGE_ID, 10 + n) for n, lv in enumerate(lvs)}
    machine_id = lvmkit.sha256(seed.encode())[:32]

    later = {
        name: lvmkit.patterned(LATER_MIB[name] * tk.MiB, f"{HOSTNAME} {name} later segment")
        for name in LATER
    }
    var_data = lvmkit.patterned(VAR_DATA_MIB * tk.MiB, f"{HOSTNAME} var data")
    trees: dict[str, tuple[tk.Files, dict[str, str]]] = {
        lv.name: (dict(lv.files), {}) for lv in lvs
    }
    root_files, root_links = _root_tree(boot_uuid, machine_id, lvs)
    trees["root"] = ({**root_files, **trees["root"][0]}, root_links)
    for name, path in LATER.items():
        trees[name][0][path] = later[name]
    trees["var"][0][VAR_DATA] = var_data

    srcs = {lv.name: tk.write_tree(work / lv.name, *trees[lv.name]) for lv in lvs}
    for d in ("boot", "proc", "sys", "dev", "run", "usr/sbin", "usr/lib64"):
        (srcs["root"] / d).mkdir(parents=True, exist_ok=True)
    for lv in lvs[1:]:  # each mountpoint, in the filesystem mounted just above it
        above = mounted_above(lv, lvs)
        (srcs[above.name] / os.path.relpath(lv.mountpoint, above.mountpoint)).mkdir(parents=True)
    fs: dict[str, Path] = {}
    for lv in lvs:
        fs[lv.name] = work / f"{lv.name}.img"
        mkfs = tk.mkfs_xfs if lv.fstype == "xfs" else tk.mkfs_ext4
        mkfs(fs[lv.name], specs[lv.name].size // tk.MiB, lv.name, fs_uuids[lv.name], srcs[lv.name])
        if lv.fstype == "xfs":
            check_xfs(fs[lv.name])
    var_start, var_length = xfs_extent(fs["var"], VAR_DATA)
    if var_length != len(var_data):
        raise tk.ImageBuildError(f"var: {VAR_DATA} holds {var_length} bytes in its extent")
    boot_files = lvm_guests.rocky_boot_files(boot_uuid, machine_id, CMDLINE)
    fs["boot"] = work / "boot.img"
    tk.mkfs_ext4(fs["boot"], BOOT_MIB, "boot", boot_uuid, tk.write_tree(work / "boot", boot_files))

    pv_mib = (PE_START + PV_EXTENTS * EXTENT) // tk.MiB + 1
    disk = out / f"{NAME}.raw"
    layout = tk.assemble(
        disk,
        1 + 1 + BOOT_MIB + pv_mib + 1,
        "gpt",
        tk.gpt_uuid(IMAGE_ID, 0),
        [
            tk.Part(1, tk.GPT_BIOS_BOOT, None, "biosboot", tk.gpt_uuid(IMAGE_ID, 1)),
            tk.Part(BOOT_MIB, tk.GPT_LINUX_FS, fs["boot"], "boot", tk.gpt_uuid(IMAGE_ID, 2)),
            tk.Part(pv_mib, lvm_guests.LVM_PV_TYPE, None, "lvm", tk.gpt_uuid(IMAGE_ID, 3)),
        ],
    )
    pvs = [PVSpec("pv0", u["pv0"], disk, layout[3]["start"], layout[3]["size"])]
    report = lvmkit.create_vg("rl", u["vg"], pvs, list(specs.values()), work, host=HOSTNAME)
    for lv in lvs:
        lvmkit.write_lv(specs[lv.name], pvs, fs[lv.name])

    later_notes = {}
    for name, path in LATER.items():
        boundary = specs[name].segments[0].extents * EXTENT
        blocks = sum(1 for b in lvmkit.ext4_blocks(fs[name], path) if b * 4096 >= boundary)
        if blocks == 0:
            raise tk.ImageBuildError(f"LV {name}: no block of {path} in a later segment")
        later_notes[name] = {
            "path": path,
            "sha256": lvmkit.sha256(later[name]),
            "blocks_in_later": blocks,
        }
    notes: dict[str, Any] = {
        "disk_files": [disk.name],
        "hostname": HOSTNAME,
        "os_release": tk.parse_os_release(lvm_guests.ROCKY_OS_RELEASE),
        "fstab": fstab(boot_uuid, lvs),
        "cmdline": CMDLINE,
        "vg": {"name": "rl", "uuid": u["vg"], "pvs": {"pv0": u["pv0"]}},
        "lvs": {
            lv.name: {
                "uuid": u[lv.name],
                "size": specs[lv.name].size,
                "segments": len(specs[lv.name].segments),
                "fstype": lv.fstype,
                "mountpoint": lv.mountpoint,
            }
            for lv in lvs
        },
        "fs_uuids": {"boot": boot_uuid, **fs_uuids},
        "files": {name: tk.text_files(files) for name, (files, _) in trees.items()}
        | {"boot": tk.text_files(boot_files)},
        "later_segment_files": later_notes,
        "var_data": {
            "path": VAR_DATA,
            "sha256": lvmkit.sha256(var_data),
            "lv_offset": var_start,
            "length": var_length,
        },
        "partitions": layout,
        "lvs_segments": report,
    }
    return disk.name, "raw", notes


def ten_lvs() -> BuiltImage:
    return tk.cached(NAME, _build, sources=(__file__, *lvm_guests.SOURCES))
