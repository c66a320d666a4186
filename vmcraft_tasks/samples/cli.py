"""`vmcraft-samples`: list, build and copy the sample images.

vmcraft-samples list
vmcraft-samples build NAME [DIR]    build (once, cached) and print the image's path;
                                    with DIR, copy it there (sparse) and print the copy
vmcraft-samples warm [NAME ...]     build every quick sample (or those named), timed
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.samples import SAMPLES, SLOW, build
from vmcraft_tasks.samples.toolkit import ImageBuildError, cache_dir, copy_image


def cmd_list(args: argparse.Namespace) -> int:
    for name in SAMPLES:
        print(f"{name}{'  (slow: minutes on first build)' if name in SLOW else ''}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    built = build(args.name)
    path = copy_image(built, args.dir) if args.dir else built.path
    print(f"{args.name}: {built.fmt}", file=sys.stderr)
    print(path)
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    names = args.names or [name for name in SAMPLES if name not in SLOW]
    print(f"cache: {cache_dir()}")
    total = time.monotonic()
    for name in names:
        started = time.monotonic()
        built = build(name)
        print(f"{name:34s} {time.monotonic() - started:7.2f}s  {built.path}")
    print(f"total {time.monotonic() - total:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmcraft-samples", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the sample names").set_defaults(func=cmd_list)
    one = sub.add_parser("build", help="build one sample and print its path")
    one.add_argument("name", help="a sample name (see `list`)")
    one.add_argument("dir", nargs="?", help="copy the image into this directory")
    one.set_defaults(func=cmd_build)
    warm = sub.add_parser("warm", help="build samples into the cache, timed")
    warm.add_argument("names", nargs="*")
    warm.set_defaults(func=cmd_warm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyError as exc:
        print(f"vmcraft-samples: {exc.args[0]}", file=sys.stderr)
        return 2
    except (CommandError, ImageBuildError) as exc:
        print(f"vmcraft-samples: build failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
