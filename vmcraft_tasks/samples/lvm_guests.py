"""Rocky Linux 9 guests on LVM (and one on two plain disks), as an installer lays them
out: a BIOS boot partition, /boot, and a PV holding VG `rl`.

`rocky_guest(...)` builds the disks of one guest into a cache directory; the recipes
`rhel_lvm`, `rhel_lvm_twin` and `thin_root` (vmcraft_tasks.samples.recipes) call it
with their own ids, hostnames and layouts. Multi-segment LVs carry data in their later
segments (checked with debugfs at build time), so a wrong segment map cannot go
unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmcraft_tasks.samples import lvmkit
from vmcraft_tasks.samples import toolkit as tk
from vmcraft_tasks.samples.lvmkit import EXTENT, PE_START, LVSpec, PVSpec, SegSpec

SOURCES = (Path(__file__), Path(lvmkit.__file__))

KERNEL = "5.14.0-362.8.1.el9_3.x86_64"
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
ROCKY_RELEASE = "Rocky Linux release 9.3 (Blue Onyx)\n"
LVM_PV_TYPE = "E6D6D379-F507-44C2-A23C-238F2A3DF928"  # GPT "Linux LVM"
LVM_CMDLINE = (
    "root=/dev/mapper/rl-root ro resume=/dev/mapper/rl-swap rd.lvm.lv=rl/root rd.lvm.lv=rl/swap"
)


def rocky_root_files(hostname: str, fstab: str, cmdline: str) -> tuple[tk.Files, dict[str, str]]:
    files: tk.Files = {
        "/etc/os-release": ROCKY_OS_RELEASE,
        "/etc/rocky-release": ROCKY_RELEASE,
        "/etc/hostname": f"{hostname}\n",
        "/etc/fstab": fstab,
        "/etc/machine-id": lvmkit.sha256(hostname.encode())[:32] + "\n",
        "/etc/default/grub": (
            "GRUB_TIMEOUT=5\nGRUB_DEFAULT=saved\nGRUB_ENABLE_BLSCFG=true\n"
            f'GRUB_CMDLINE_LINUX="crashkernel=1G-4G:192M {cmdline.split(" ", 2)[-1]}"\n'
        ),
        "/etc/lvm/lvm.conf": "# guest lvm.conf (never read by the host)\n",
        "/usr/lib/sysimage/rpm/rpmdb.sqlite": b"SQLite format 3\x00",
    }
    symlinks = {
        "/etc/redhat-release": "rocky-release",
        "/etc/system-release": "rocky-release",
        "/bin": "usr/bin",
        "/sbin": "usr/sbin",
        "/lib": "usr/lib",
        "/lib64": "usr/lib64",
    }
    return files, symlinks


def rocky_boot_files(boot_uuid: str, machine_id: str, cmdline: str) -> tk.Files:
    entry = (
        f"title Rocky Linux ({KERNEL}) 9.3 (Blue Onyx)\n"
        f"version {KERNEL}\n"
        f"linux /vmlinuz-{KERNEL}\n"
        f"initrd /initramfs-{KERNEL}.img $tuned_initrd\n"
        f"options {cmdline}\n"
        "grub_users $grub_users\ngrub_arg --unrestricted\ngrub_class rocky\n"
    )
    grub_cfg = (
        "set default=0\nset timeout=5\n"
        f"search --no-floppy --fs-uuid --set=root {boot_uuid}\n"
        "insmod blscfg\nblscfg\n"
    )
    return {
        f"/vmlinuz-{KERNEL}": f"dummy kernel {KERNEL}\n",
        f"/initramfs-{KERNEL}.img": f"dummy initramfs {KERNEL}\n",
        f"/loader/entries/{machine_id}-{KERNEL}.conf": entry,
        "/grub2/grub.cfg": grub_cfg,
        "/grub2/grubenv": "# GRUB Environment Block\nsaved_entry=" + f"{machine_id}-{KERNEL}\n",
    }


def lvm_fstab(boot_uuid: str, *, home: bool = True) -> str:
    lines = [
        "# /etc/fstab",
        "# Created by anaconda",
        "/dev/mapper/rl-root     /                       ext4    defaults        1 1",
        f"UUID={boot_uuid} /boot                   ext4    defaults        1 2",
    ]
    if home:
        lines.append("/dev/mapper/rl-home     /home                   ext4    defaults        1 2")
    lines += [
        "/dev/mapper/rl-var      /var                    xfs     defaults        0 0",
        "/dev/mapper/rl-swap     none                    swap    defaults        0 0",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RockyLVM:
    """One guest's parameters: a GPT disk 1 with a PV, optionally a whole-disk PV on disk 2."""

    name: str  # file name stem
    image_id: int
    hostname: str
    two_disks: bool  # home spans the end of disk 1's PV and disk 2's whole-disk PV
    root_later_mib: int = 40  # data file on root, larger than root's first segment
    tags: dict[str, str] = field(default_factory=dict)


# Extents (4 MiB) of the data LVs, and where they sit on PV0 (disk 1's partition 3):
# root seg1 [0,8), swap [8,12), var [12,87), root seg2 [87,111), home [111, ...).
ROOT_SEGS = (8, 24)
SWAP_EXTENTS = 4
VAR_EXTENTS = 75  # 300 MiB: mkfs.xfs's minimum
HOME_ON_PV0 = {True: 2, False: 12}
HOME_ON_PV1 = 10
PV1_EXTENTS = 12
BOOT_MIB = 64


def build_rocky_lvm(g: RockyLVM, out: Path, work: Path) -> tuple[str, str, dict[str, Any]]:
    seed = f"{g.name}-{g.image_id}"
    u = {
        k: lvmkit.lvm_uuid(f"{seed}-{k}")
        for k in ("vg", "pv0", "pv1", "root", "swap", "var", "home")
    }
    boot_uuid = tk.fs_uuid(g.image_id, 2)
    root_uuid, var_uuid = tk.fs_uuid(g.image_id, 10), tk.fs_uuid(g.image_id, 11)
    home_uuid, swap_uuid = tk.fs_uuid(g.image_id, 12), tk.fs_uuid(g.image_id, 13)
    machine_id = lvmkit.sha256(seed.encode())[:32]

    pv0_extents = sum(ROOT_SEGS) + SWAP_EXTENTS + VAR_EXTENTS + HOME_ON_PV0[g.two_disks]
    pv0_mib = (PE_START + pv0_extents * EXTENT) // tk.MiB + 1
    disk1_mib = 1 + 1 + BOOT_MIB + pv0_mib + 1

    fstab = lvm_fstab(boot_uuid)
    root_files, root_links = rocky_root_files(g.hostname, fstab, LVM_CMDLINE)
    root_files["/etc/machine-id"] = machine_id + "\n"
    later_name = "/opt/later/segment2.dat"
    later = lvmkit.patterned(g.root_later_mib * tk.MiB, f"{g.hostname} root later segment")
    root_files[later_name] = later
    root_files["/root/marker.txt"] = f"{g.hostname} root marker\n"
    boot_files = rocky_boot_files(boot_uuid, machine_id, LVM_CMDLINE)
    var_files: tk.Files = {
        "/log/messages": f"Dec  1 12:00:00 {g.hostname} kernel: vmcraft marker: var LV\n",
        "/lib/rpm/.marker": "rpm db lives in /usr/lib/sysimage/rpm on el9\n",
    }
    home_data = lvmkit.patterned(16 * tk.MiB, f"{g.hostname} home spanning data")
    home_files: tk.Files = {
        "/rocky/notes.txt": f"{g.hostname} home notes\n",
        "/rocky/big/spanning.dat": home_data,
    }

    trees = {
        "root": (root_files, root_links),
        "boot": (boot_files, {}),
        "var": (var_files, {}),
        "home": (home_files, {}),
    }
    uuids = {"boot": boot_uuid, "root": root_uuid, "var": var_uuid, "home": home_uuid}
    fs = _make_filesystems(g, work, trees, {**uuids, "swap": swap_uuid})

    disk1 = out / f"{g.name}-disk1.raw"
    layout1 = tk.assemble(
        disk1,
        disk1_mib,
        "gpt",
        tk.gpt_uuid(g.image_id, 0),
        [
            tk.Part(1, tk.GPT_BIOS_BOOT, None, "biosboot", tk.gpt_uuid(g.image_id, 1)),
            tk.Part(BOOT_MIB, tk.GPT_LINUX_FS, fs["boot"], "boot", tk.gpt_uuid(g.image_id, 2)),
            tk.Part(pv0_mib, LVM_PV_TYPE, None, "lvm", tk.gpt_uuid(g.image_id, 3)),
        ],
    )
    disks = [disk1]
    pvs = [PVSpec("pv0", u["pv0"], disk1, layout1[3]["start"], layout1[3]["size"])]
    if g.two_disks:
        disk2 = out / f"{g.name}-disk2.raw"
        tk.new_sparse_file(disk2, (PE_START + PV1_EXTENTS * EXTENT))
        disks.append(disk2)
        pvs.append(PVSpec("pv1", u["pv1"], disk2, 0, PE_START + PV1_EXTENTS * EXTENT))

    r0, r1 = ROOT_SEGS
    home_segs = [SegSpec(HOME_ON_PV0[g.two_disks], "pv0", r0 + SWAP_EXTENTS + VAR_EXTENTS + r1)]
    if g.two_disks:
        home_segs.append(SegSpec(HOME_ON_PV1, "pv1", 0))
    lvs = [
        LVSpec("home", u["home"], tuple(home_segs)),
        LVSpec(
            "root",
            u["root"],
            (SegSpec(r0, "pv0", 0), SegSpec(r1, "pv0", r0 + SWAP_EXTENTS + VAR_EXTENTS)),
        ),
        LVSpec("swap", u["swap"], (SegSpec(SWAP_EXTENTS, "pv0", r0),)),
        LVSpec("var", u["var"], (SegSpec(VAR_EXTENTS, "pv0", r0 + SWAP_EXTENTS),)),
    ]
    segments = lvmkit.create_vg("rl", u["vg"], pvs, lvs, work, host=g.hostname)
    by_name = {lv.name: lv for lv in lvs}
    for name in ("root", "swap", "var", "home"):
        lvmkit.write_lv(by_name[name], pvs, fs[name])

    # Data in the later segments: every multi-segment LV has blocks past its first one.
    later_blocks = {
        "root": _blocks_after(fs["root"], later_name, r0 * EXTENT),
        "home": _blocks_after(fs["home"], "/rocky/big/spanning.dat", home_segs[0].extents * EXTENT)
        if g.two_disks
        else 0,
    }
    if later_blocks["root"] == 0 or (g.two_disks and later_blocks["home"] == 0):
        raise tk.ImageBuildError(f"no data in a later segment: {later_blocks}")

    notes: dict[str, Any] = {
        "disk_files": [d.name for d in disks],
        "hostname": g.hostname,
        "os_release": tk.parse_os_release(ROCKY_OS_RELEASE),
        "fstab": fstab,
        "cmdline": LVM_CMDLINE,
        "vg": {"name": "rl", "uuid": u["vg"], "pvs": {pv.key: pv.uuid for pv in pvs}},
        "lvs": {
            lv.name: {"uuid": lv.uuid, "size": lv.size, "segments": len(lv.segments)} for lv in lvs
        },
        "fs_uuids": {
            "boot": boot_uuid,
            "root": root_uuid,
            "var": var_uuid,
            "home": home_uuid,
            "swap": swap_uuid,
        },
        "fs_types": {"root": "ext4", "var": "xfs", "home": "ext4", "swap": "swap", "boot": "ext4"},
        "partitions": layout1,
        "files": {
            "root": {
                "/etc/hostname": f"{g.hostname}\n",
                "/root/marker.txt": f"{g.hostname} root marker\n",
            },
            "var": tk.text_files(var_files),
            "home": {"/rocky/notes.txt": f"{g.hostname} home notes\n"},
            "boot": tk.text_files(boot_files),
        },
        "later_segment_files": {
            "root": {
                "path": later_name,
                "sha256": lvmkit.sha256(later),
                "blocks_in_later": later_blocks["root"],
            },
            "home": {
                "path": "/rocky/big/spanning.dat",
                "sha256": lvmkit.sha256(home_data),
                "blocks_in_later": later_blocks["home"],
            },
        },
        "lvs_segments": segments,
    }
    return disk1.name, "raw", notes


def _blocks_after(fs_file: Path, guest_path: str, boundary: int) -> int:
    """How many 4 KiB blocks of the file lie at or past byte `boundary` of the fs."""
    return sum(1 for b in lvmkit.ext4_blocks(fs_file, guest_path) if b * 4096 >= boundary)


# --------------------------------------------------------------------------- thin root

THIN_POOL_EXTENTS = 16
THIN_ROOT_EXTENTS = 32  # virtual size: 128 MiB in a 64 MiB pool


def _thin_pool_segment() -> str:
    return (
        "\t\t\tsegment1 {\n"
        "\t\t\t\tstart_extent = 0\n"
        f"\t\t\t\textent_count = {THIN_POOL_EXTENTS}\n"
        '\t\t\t\ttype = "thin-pool"\n'
        '\t\t\t\tmetadata = "pool00_tmeta"\n'
        '\t\t\t\tpool = "pool00_tdata"\n'
        "\t\t\t\ttransaction_id = 1\n"
        "\t\t\t\tchunk_size = 128\n"
        '\t\t\t\tdiscards = "passdown"\n'
        "\t\t\t\tzero_new_blocks = 1\n"
        "\t\t\t}\n"
    )


def _thin_segment() -> str:
    return (
        "\t\t\tsegment1 {\n"
        "\t\t\t\tstart_extent = 0\n"
        f"\t\t\t\textent_count = {THIN_ROOT_EXTENTS}\n"
        '\t\t\t\ttype = "thin"\n'
        '\t\t\t\tthin_pool = "pool00"\n'
        "\t\t\t\ttransaction_id = 0\n"
        "\t\t\t\tdevice_id = 1\n"
        "\t\t\t}\n"
    )


def build_thin_root(
    name: str, image_id: int, hostname: str, out: Path, work: Path
) -> tuple[str, str, dict[str, Any]]:
    """GPT: BIOS boot, /boot, a PV whose VG `rl` has a thin pool `pool00` holding the
    thin LV `root`, and a linear `swap`. The root cannot be exposed in userspace."""
    seed = f"{name}-{image_id}"
    u = {
        k: lvmkit.lvm_uuid(f"{seed}-{k}")
        for k in ("vg", "pv0", "pool", "root", "swap", "spare", "tmeta", "tdata")
    }
    boot_uuid = tk.fs_uuid(image_id, 2)
    swap_uuid = tk.fs_uuid(image_id, 13)
    machine_id = lvmkit.sha256(seed.encode())[:32]
    cmdline = "root=/dev/mapper/rl-root ro rd.lvm.lv=rl/root rd.lvm.lv=rl/swap"
    boot_files = rocky_boot_files(boot_uuid, machine_id, cmdline)
    fs = {"boot": work / "boot.img", "swap": work / "swap.img"}
    tk.mkfs_ext4(fs["boot"], 32, "boot", boot_uuid, tk.write_tree(work / "boot", boot_files))
    tk.mkswap(fs["swap"], SWAP_EXTENTS * EXTENT // tk.MiB, "swap", swap_uuid)
    extents = 1 + 1 + THIN_POOL_EXTENTS + SWAP_EXTENTS
    pv_mib = (PE_START + extents * EXTENT) // tk.MiB + 1
    disk = out / f"{name}.raw"
    layout = tk.assemble(
        disk,
        1 + 1 + 32 + pv_mib + 1,
        "gpt",
        tk.gpt_uuid(image_id, 0),
        [
            tk.Part(1, tk.GPT_BIOS_BOOT, None, "biosboot", tk.gpt_uuid(image_id, 1)),
            tk.Part(32, tk.GPT_LINUX_FS, fs["boot"], "boot", tk.gpt_uuid(image_id, 2)),
            tk.Part(pv_mib, LVM_PV_TYPE, None, "lvm", tk.gpt_uuid(image_id, 3)),
        ],
    )
    pvs = [PVSpec("pv0", u["pv0"], disk, layout[3]["start"], layout[3]["size"])]
    swap = LVSpec("swap", u["swap"], (SegSpec(SWAP_EXTENTS, "pv0", 2 + THIN_POOL_EXTENTS),))
    lvs = [
        LVSpec("pool00", u["pool"], raw_segments=(_thin_pool_segment(),)),
        LVSpec("root", u["root"], raw_segments=(_thin_segment(),)),
        swap,
        LVSpec("lvol0_pmspare", u["spare"], (SegSpec(1, "pv0", 0),), visible=False),
        LVSpec("pool00_tmeta", u["tmeta"], (SegSpec(1, "pv0", 1),), visible=False),
        LVSpec("pool00_tdata", u["tdata"], (SegSpec(THIN_POOL_EXTENTS, "pv0", 2),), visible=False),
    ]
    segments = lvmkit.create_vg("rl", u["vg"], pvs, lvs, work, host=hostname, force=True)
    lvmkit.write_lv(swap, pvs, fs["swap"])
    notes: dict[str, Any] = {
        "disk_files": [disk.name],
        "hostname": hostname,
        "cmdline": cmdline,
        "vg": {"name": "rl", "uuid": u["vg"], "pvs": {"pv0": u["pv0"]}},
        "lvs": {
            "root": {"uuid": u["root"], "thin_pool": "pool00"},
            "pool00": {"uuid": u["pool"]},
            "swap": {"uuid": u["swap"], "size": swap.size},
        },
        "fs_uuids": {"boot": boot_uuid, "swap": swap_uuid},
        "partitions": layout,
        "lvs_segments": segments,
    }
    return disk.name, "raw", notes


# --------------------------------------------------------------------------- two disks


def build_two_disks(
    name: str, image_id: int, hostname: str, out: Path, work: Path
) -> tuple[str, str, dict[str, Any]]:
    """Rocky 9 without LVM on two GPT disks: disk 1 BIOS boot, /boot, /; disk 2 /var
    (xfs, named by UUID in fstab) and /srv (ext4, named `/dev/sdb2`)."""
    uuid = {n: tk.fs_uuid(image_id, n) for n in (2, 3, 21, 22)}
    fstab = (
        "# /etc/fstab\n"
        f"UUID={uuid[3]} /     ext4 defaults 1 1\n"
        f"UUID={uuid[2]} /boot ext4 defaults 1 2\n"
        f"UUID={uuid[21]} /var  xfs  defaults 0 0\n"
        "/dev/sdb2 /srv ext4 defaults 1 2\n"
    )
    cmdline = f"root=UUID={uuid[3]} ro"
    machine_id = lvmkit.sha256(name.encode())[:32]
    root_files, root_links = rocky_root_files(hostname, fstab, cmdline)
    root_files["/etc/machine-id"] = machine_id + "\n"
    var_files: tk.Files = {"/log/messages": f"{hostname} var on disk 2 by UUID\n"}
    srv_files: tk.Files = {"/www/index.html": f"<h1>{hostname} srv on /dev/sdb2</h1>\n"}
    root_src = tk.write_tree(work / "root", root_files, root_links)
    for d in ("boot", "var", "srv", "proc", "usr/bin", "usr/sbin", "usr/lib64"):
        (root_src / d).mkdir(parents=True, exist_ok=True)
    fs = {n: work / f"p{n}.img" for n in (2, 3, 21, 22)}
    tk.mkfs_ext4(
        fs[2],
        32,
        "boot",
        uuid[2],
        tk.write_tree(work / "boot", rocky_boot_files(uuid[2], machine_id, cmdline)),
    )
    tk.mkfs_ext4(fs[3], 48, "root", uuid[3], root_src)
    tk.mkfs_xfs(fs[21], 300, "var", uuid[21], tk.write_tree(work / "var", var_files))
    tk.mkfs_ext4(fs[22], 32, "srv", uuid[22], tk.write_tree(work / "srv", srv_files))
    disk1, disk2 = out / f"{name}-disk1.raw", out / f"{name}-disk2.raw"
    layout1 = tk.assemble(
        disk1,
        1 + 1 + 32 + 48 + 1,
        "gpt",
        tk.gpt_uuid(image_id, 0),
        [
            tk.Part(1, tk.GPT_BIOS_BOOT, None, "biosboot", tk.gpt_uuid(image_id, 1)),
            tk.Part(32, tk.GPT_LINUX_FS, fs[2], "boot", tk.gpt_uuid(image_id, 2)),
            tk.Part(48, tk.GPT_LINUX_FS, fs[3], "root", tk.gpt_uuid(image_id, 3)),
        ],
    )
    layout2 = tk.assemble(
        disk2,
        1 + 300 + 32 + 1,
        "gpt",
        tk.gpt_uuid(image_id + 1, 0),
        [
            tk.Part(300, tk.GPT_LINUX_FS, fs[21], "var", tk.gpt_uuid(image_id + 1, 1)),
            tk.Part(32, tk.GPT_LINUX_FS, fs[22], "srv", tk.gpt_uuid(image_id + 1, 2)),
        ],
    )
    notes: dict[str, Any] = {
        "disk_files": [disk1.name, disk2.name],
        "hostname": hostname,
        "os_release": tk.parse_os_release(ROCKY_OS_RELEASE),
        "fstab": fstab,
        "fs_uuids": {"boot": uuid[2], "root": uuid[3], "var": uuid[21], "srv": uuid[22]},
        "partitions": {1: layout1, 2: layout2},
        "mountpoints": {"/": (1, 3), "/boot": (1, 2), "/var": (2, 1), "/srv": (2, 2)},
        "files": {"var": tk.text_files(var_files), "srv": tk.text_files(srv_files)},
    }
    return disk1.name, "raw", notes


def _make_filesystems(
    g: RockyLVM,
    work: Path,
    trees: dict[str, tuple[tk.Files, dict[str, str]]],
    uuids: dict[str, str],
) -> dict[str, Path]:
    """The filesystem images of a Rocky LVM guest, each in its own sparse file."""
    src = {name: tk.write_tree(work / name, files, links) for name, (files, links) in trees.items()}
    for d in (
        "boot",
        "home",
        "var",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "usr/bin",
        "usr/sbin",
        "usr/lib64",
    ):
        (src["root"] / d).mkdir(parents=True, exist_ok=True)
    root_mib = sum(ROOT_SEGS) * EXTENT // tk.MiB
    home_mib = (HOME_ON_PV0[g.two_disks] + (HOME_ON_PV1 if g.two_disks else 0)) * EXTENT // tk.MiB
    fs = {k: work / f"{k}.img" for k in ("boot", "root", "var", "home", "swap")}
    tk.mkfs_ext4(fs["boot"], BOOT_MIB, "boot", uuids["boot"], src["boot"])
    tk.mkfs_ext4(fs["root"], root_mib, "root", uuids["root"], src["root"])
    tk.mkfs_xfs(fs["var"], VAR_EXTENTS * EXTENT // tk.MiB, "var", uuids["var"], src["var"])
    tk.mkfs_ext4(fs["home"], home_mib, "home", uuids["home"], src["home"])
    tk.mkswap(fs["swap"], SWAP_EXTENTS * EXTENT // tk.MiB, "swap", uuids["swap"])
    return fs
