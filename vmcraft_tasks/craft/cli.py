"""`vmcraft inspect IMAGE [--json]`: partitions, filesystems, how each mounted, OS facts."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.inspect_disk import DiskReport
from vmcraft_tasks.craft.settings import BACKENDS, CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft


def _human_size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"


def render_text(report: DiskReport, elapsed_s: float) -> str:
    """The human-readable report (pure)."""
    img = report.image
    lines = [
        f"image     {img['path']}",
        f"format    {img['format']}, {_human_size(img['virtual_size'])}"
        + (f", backing chain: {' -> '.join(img['backing_chain'])}" if img["backing_chain"] else ""),
        f"attach    {report.backend} backend, {report.attach_attempts} attempt(s), "
        + ("read-only (throw-away overlay)" if report.readonly else "read-write"),
        "",
        f"{'#':>3}  {'size':>10}  {'type':<8} {'label':<14} {'uuid':<38} mount",
    ]
    fs_by_part = {f.partition: f for f in report.filesystems}
    for part in report.partitions:
        fs = fs_by_part.get(part.number)
        mount = report.mounts.get(part.number)
        if mount is None:
            how = "-"
        elif mount.ok:
            how = f"{mount.strategy} ({mount.driver})"
            if mount.stale_view:
                how += ", STALE pre-journal view"
            if mount.journal_replayed:
                how += ", journal replayed in overlay"
        else:
            how = f"FAILED: {mount.error}"
        fstype = fs.type if fs and fs.type else "-"
        label = fs.label if fs and fs.label else "-"
        uuid = fs.uuid if fs and fs.uuid else "-"
        size = _human_size(part.size_bytes)
        lines.append(f"{part.number:>3}  {size:>10}  {fstype:<8} {label:<14} {uuid:<38} {how}")
    lines.append("")
    if not report.roots:
        lines.append("no operating system found")
    for root in report.roots:
        lines.append(f"root on partition {root.root_partition}: {root.type}")
        for label, value in (
            ("distro", root.distro),
            ("product", root.product_name),
            ("version", f"{root.major}.{root.minor}" if root.major is not None else None),
            ("arch", root.arch),
            ("hostname", root.hostname),
            ("packages", root.package_format),
        ):
            lines.append(f"  {label:<9} {value if value is not None else 'unknown'}")
        if root.fstab:
            lines.append("  fstab")
            for entry in root.fstab:
                target = (
                    f"partition {entry.resolved_partition}"
                    if entry.resolved_partition is not None
                    else "not on this disk"
                )
                lines.append(f"    {entry.entry.spec:<44} {entry.entry.mountpoint:<12} -> {target}")
        for note in root.notes or []:
            lines.append(f"  note: {note}")
    lines.append("")
    lines.append(f"inspected in {elapsed_s * 1000:.0f} ms")
    return "\n".join(lines)


def _sample_image() -> str:
    # Imported here: the sample builder is only needed for this one option.
    from vmcraft_tasks.samples import imagebuild

    built = imagebuild.linux_gpt_raw()
    print(f"sample image: {built.path}", file=sys.stderr)
    return built.path


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.sample == (args.image is not None):
        raise SystemExit("vmcraft inspect: give either IMAGE or --sample")
    image = _sample_image() if args.sample else args.image
    started = time.perf_counter()
    settings = CraftSettings(backend=args.backend)
    with VMCraft(image, settings=settings) as g:
        report = g.inspect(max_workers=args.max_workers)
        # Unmount before printing so the reported time covers the whole job.
        g.umount_all()
    elapsed = time.perf_counter() - started
    if args.json:
        data = report.to_dict()
        data["elapsed_ms"] = round(elapsed * 1000, 1)
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render_text(report, elapsed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmcraft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="inspect a disk image read-only")
    inspect.add_argument("image", nargs="?")
    inspect.add_argument(
        "--sample", action="store_true", help="build (once) and inspect a sample Linux disk"
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
        print("vmcraft: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmcraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
