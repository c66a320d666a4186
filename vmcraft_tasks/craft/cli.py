"""`vmcraft inspect IMAGE [IMAGE ...] [--json]`: partitions, filesystems, how each mounted,
OS facts. Several images are the disks of one VM, the boot disk first.

`vmcraft boot-check IMAGE [IMAGE ...] [--domain XML] [--accel auto|tcg|kvm]
[--time-limit S] [--json]`: boot the VM headless and judge its console; exit 0 when it
passed, 1 when it failed, 2 when it was skipped or could not run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from vmcraft_tasks.craft.boot.check import BootCheckResult, check_guest
from vmcraft_tasks.craft.boot.qemu import QemuSpecError
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.guestvm import GuestVM
from vmcraft_tasks.craft.images import probe_image
from vmcraft_tasks.craft.render import human_size, render_report
from vmcraft_tasks.craft.settings import BACKENDS, CraftSettings
from vmcraft_tasks.craft.textsafe import for_terminal
from vmcraft_tasks.craft.vmcraft import VMCraft


def cmd_inspect(args: argparse.Namespace) -> int:
    images = args.image if isinstance(args.image, list) else [args.image]
    if len(images) > 1:
        return _inspect_vm(args, images)
    image = images[0]
    started = time.perf_counter()
    settings = CraftSettings(backend=args.backend)
    with VMCraft(image, settings=settings) as g:
        report = g.inspect(max_workers=args.max_workers)
        # Unmount before printing so the reported time covers the whole job.
        g.umount_all()
    data = report.to_dict()
    data["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else render_report(data))
    return 0


def _inspect_vm(args: argparse.Namespace, images: list[str]) -> int:
    """Several images: one VM, attached and inspected as a whole (boot disk first)."""
    started = time.perf_counter()
    settings = CraftSettings(backend=args.backend)
    with GuestVM(images, settings=settings) as vm:
        report = vm.inspect(max_workers=args.max_workers)
        vm.umount_all()
    data = report.to_dict()
    data["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else render_vm_report(data))
    return 0


def _t(value: Any, max_len: int = 200) -> str:
    return for_terminal("" if value is None else value, max_len=max_len)


def render_vm_report(report: dict[str, Any]) -> str:
    """Text for a `VMReport.to_dict()` (pure): disks, LVs, volumes, roots, notes."""
    lines = []
    for disk in report["disks"]:
        lines.append(
            f"disk {disk['disk']}    {_t(disk['path'], 1000)} ({_t(disk['format'])}, "
            f"{human_size(disk['virtual_size'])}, {len(disk['partitions'])} partition(s))"
        )
    lines.append("")
    mounts = report["mounts"]
    for vol in report["volumes"]:
        mount = mounts.get(str(vol["number"]))
        how = "-" if mount is None else ("mounted" if mount["ok"] else "FAILED: ")
        if mount is not None and not mount["ok"]:
            how += _t(mount["error"], 400)
        what = vol["type"] or vol.get("content") or "-"
        lines.append(
            f"{vol['number']:>6}  {_t(vol['label'], 64):<24} {_t(what, 40):<12} "
            f"{_t(vol['fs_label'] or '-', 64):<14} {how}"
        )
    for lv in report["lvs"]:
        exposed = f"exposed via {lv['method']}" if lv["method"] else f"NOT exposed: {lv['reason']}"
        lines.append(
            f"LV {_t(lv['vg'])}/{_t(lv['lv'])} {human_size(lv['size'])}: {_t(exposed, 1000)}"
        )
    labels = {v["number"]: v["label"] for v in report["volumes"]}
    lines.append("")
    if not report["roots"]:
        lines.append("no operating system found")
    for root in report["roots"]:
        number = root["root_partition"]
        lines.append(f"root on {_t(labels.get(number, number))}: {_t(root['type'])}")
        for key in ("product_name", "hostname", "arch"):
            lines.append(f"  {key:<12} {_t(root.get(key)) or 'unknown'}")
        for entry in root.get("fstab") or []:
            part = entry["resolved_partition"]
            target = (
                _t(labels.get(part, part))
                if part is not None
                else f"unresolved ({entry['reason']})"
            )
            lines.append(
                f"    {_t(entry['spec']):<44} {_t(entry['mountpoint']):<12} -> {_t(target, 400)}"
            )
    lines += [f"note: {_t(note, 1000)}" for note in report["notes"]]
    if "elapsed_ms" in report:
        lines += ["", f"inspected in {report['elapsed_ms']:.0f} ms"]
    return "\n".join(lines)


EXIT_PASS, EXIT_FAIL, EXIT_SKIPPED = 0, 1, 2


def render_boot_check(result: BootCheckResult) -> str:
    """Text for a boot check's result (pure)."""
    lines = [
        f"boot check: {result.result.upper()} ({_t(result.reason)})",
        f"  mode       {_t(result.mode)}",
        f"  firmware   {_t(result.firmware)}",
        f"  accel      {_t(result.accel)}",
        f"  seconds    {result.seconds:.1f}",
    ]
    lines += [f"  evidence   {_t(line, 400)}" for line in result.evidence]
    lines += [f"note: {_t(note, 1000)}" for note in result.notes]
    if result.serial_log:
        lines.append(f"console log: {_t(result.serial_log, 1000)}")
    return "\n".join(lines)


def _image_formats(images: list[str], settings: CraftSettings) -> list[tuple[str, str]]:
    # The format qemu is told is the one the image check found, never a guess of qemu's.
    return [(image, probe_image(image, settings=settings).format) for image in images]


def cmd_boot_check(args: argparse.Namespace) -> int:
    settings = CraftSettings(backend=args.backend)
    try:
        # Any error is "could not check" (2), never a verdict on the guest (1).
        domain_xml = None
        if args.domain:
            with open(args.domain, encoding="utf-8") as fh:
                domain_xml = fh.read()
        work_dir = args.work_dir or tempfile.mkdtemp(prefix="boot-check-")
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        result = check_guest(
            _image_formats(args.image, settings),
            domain_xml=domain_xml,
            work_dir=work_dir,
            time_limit_s=args.time_limit,
            accel=args.accel,
            settings=settings,
        )
    except (VMCraftError, QemuSpecError, OSError) as exc:
        print("vmcraft: boot check could not run: " + for_terminal(str(exc)), file=sys.stderr)
        return EXIT_SKIPPED
    print(
        json.dumps(result.to_dict(), indent=2, sort_keys=True)
        if args.json
        else render_boot_check(result)
    )
    return {"pass": EXIT_PASS, "fail": EXIT_FAIL}.get(result.result, EXIT_SKIPPED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmcraft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="inspect a disk image read-only")
    inspect.add_argument(
        "image",
        nargs="+",
        help="a disk image (sample disks: `vmcraft-samples build linux_gpt_raw`); several "
        "images are the disks of one VM, the boot disk first",
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--backend", choices=BACKENDS, default="auto")
    inspect.add_argument("--max-workers", type=int, default=4)
    inspect.set_defaults(func=cmd_inspect)
    boot = sub.add_parser(
        "boot-check",
        help="boot a VM's disks headless under qemu (snapshot=on, nothing written) "
        "and judge its serial console",
    )
    boot.add_argument("image", nargs="+", help="the VM's disk images, the boot disk first")
    boot.add_argument(
        "--domain",
        metavar="XML",
        help="libvirt domain XML: firmware, machine, disk bus and NIC come from it "
        "(default: BIOS, or UEFI with an ESP; q35; virtio; no NIC)",
    )
    boot.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto")
    boot.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="seconds for the whole boot (default 600 under TCG, 180 with KVM)",
    )
    boot.add_argument("--json", action="store_true", help="machine-readable output")
    boot.add_argument("--backend", choices=BACKENDS, default="auto")
    boot.add_argument(
        "--work-dir",
        help="where the serial and console logs go (default: a new directory in $TMPDIR, kept)",
    )
    boot.set_defaults(func=cmd_boot_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except VMCraftError as exc:
        # One line: scripts grep it and people read it.
        # Error messages quote guest paths and names: printed as data, on one line.
        print("vmcraft: " + for_terminal(str(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmcraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
