"""`vmcraft inspect IMAGE [--json]`: partitions, filesystems, how each mounted, OS facts."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.render import render_report
from vmcraft_tasks.craft.settings import BACKENDS, CraftSettings
from vmcraft_tasks.craft.textsafe import for_terminal
from vmcraft_tasks.craft.vmcraft import VMCraft


def cmd_inspect(args: argparse.Namespace) -> int:
    image = args.image
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmcraft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="inspect a disk image read-only")
    inspect.add_argument(
        "image", help="a disk image (sample disks: `vmcraft-samples build linux_gpt_raw`)"
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
