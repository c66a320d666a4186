"""`vmcraft-tasks`: the fleet's command line.

vmcraft-tasks inspect IMAGE [--json]    inspect one image on the fleet named by the settings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from scheduler.submit import FleetClient, NoHostOnlineError
from vmcraft_tasks.craft.render import render_report


def cmd_inspect(args: argparse.Namespace) -> int:
    client = FleetClient.from_env()
    started = time.perf_counter()
    try:
        job_id = client.submit_inspect(args.image)
        record = client.wait(job_id, args.timeout)
    finally:
        client.close()
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    if not record.finished:
        print(
            f"vmcraft-tasks: job {job_id} still {record.status} after {args.timeout:.0f} s",
            file=sys.stderr,
        )
        return 2
    if record.status != "done" or record.result is None:
        print(
            f"vmcraft-tasks: {' '.join((record.error or record.status).split())}", file=sys.stderr
        )
        return 1
    report = {**record.result, "elapsed_ms": elapsed_ms, "job_id": job_id}
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else render_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmcraft-tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="inspect one disk image on the fleet")
    inspect.add_argument("image")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NoHostOnlineError as exc:
        print(f"vmcraft-tasks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
