"""`vmcraft inspect IMAGE [IMAGE ...] [--json]`: partitions, filesystems, how each mounted,
OS facts. Several images are the disks of one VM, the boot disk first."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.guestvm import GuestVM
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
