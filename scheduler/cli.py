"""`vmcraft-tasks`: the fleet's command line.

vmcraft-tasks demo                      build a sample batch and run it (no setup needed)
vmcraft-tasks run MANIFEST              run a batch: on the configured fleet, or on a
                                        private one (own redis-server + local workers)
vmcraft-tasks submit MANIFEST           queue a batch on the configured fleet
vmcraft-tasks status BATCH [--json]     where every VM stands
vmcraft-tasks watch BATCH               live progress until the batch ends, then the summary
vmcraft-tasks cancel BATCH              stop every VM that has not ended
vmcraft-tasks resume BATCH              run again what did not finish
vmcraft-tasks report BATCH              write the reports again and print the summary
vmcraft-tasks inspect IMAGE [--json]    inspect one image on the fleet
vmcraft-tasks schema manifest|report     the JSON Schema of the manifest or of a VM report

Exit codes: 0 done; 1 the work ran and did not succeed (a VM failed, no host is
online); 2 it could not be carried out: an invalid manifest or settings, a broker
that cannot be reached or refuses us, a batch or job that is not on the fleet, a
wait that timed out; 130 interrupted. Errors are one line on stderr (a manifest's
problems: one line each), with every URL's password masked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from scheduler import batch as batch_api
from scheduler.embedded_run import broker_configured, embedded_fleet, say
from scheduler.intake import load_for_run
from scheduler.manifest import ManifestError
from scheduler.submit import (
    BROKER_ERRORS,
    BrokerUnavailableError,
    FleetClient,
    FleetSettingsError,
    NoHostOnlineError,
)
from scheduler.watch import watch_batch
from vmcraft_tasks.config import DEFAULT_REDIS, FleetSettings
from vmcraft_tasks.craft.render import render_report
from vmcraft_tasks.craft.textsafe import for_terminal
from vmcraft_tasks.jobs import JobNotFoundError
from vmcraft_tasks.models.schemas import SCHEMAS, schema_text
from vmcraft_tasks.reports import render_markdown
from vmcraft_tasks.urls import mask_urls_in

EXIT_FAILED = 1  # the work ran and did not succeed
EXIT_UNAVAILABLE = 2  # the command could not be carried out at all


def cmd_inspect(args: argparse.Namespace) -> int:
    client = FleetClient.from_env()
    started = time.perf_counter()
    try:
        with client.broker_errors():
            job_id = client.submit_inspect(args.image)
            record = client.wait(job_id, args.timeout)
    finally:
        client.close()
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    if not record.finished:
        return _fail(
            f"job {job_id} still {record.status} after {args.timeout:.0f} s", EXIT_UNAVAILABLE
        )
    if record.status != "done" or record.result is None:
        return _fail(record.error or record.status, EXIT_FAILED)
    report = {**record.result, "elapsed_ms": elapsed_ms, "job_id": job_id}
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else render_report(report))
    return 0


def _finish(client: FleetClient, name: str, started: float) -> int:
    summary = batch_api.batch_report(client, name)
    print()
    print(render_markdown(summary))
    say(f"reports: {summary.get('reports_dir', '?')}  ({time.monotonic() - started:.1f} s)")
    counts = summary["counts"]
    return 0 if counts["by_status"].get("done", 0) == counts["total"] else 1


def _announce(failed: dict[str, str]) -> None:
    for vm_id, reason in failed.items():
        say(for_terminal(f"{vm_id} will fail: {reason}"))


def run_batch(manifest: str, *, hosts: int, concurrency: int) -> int:
    # Validate before starting anything, against the image roots this fleet allows.
    settings = _settings()
    plan, failed = load_for_run(
        manifest, image_roots=settings.image_roots, output_roots=settings.output_roots
    )
    started = time.monotonic()
    if broker_configured():
        client = FleetClient.from_env()
        try:
            # A broker that cannot be reached is the one line this run prints, not the
            # last line after every VM's warning.
            client.ping()
            _announce(failed)
            with client.broker_errors():
                name = batch_api.submit_batch(client, plan, failed=failed)
                watch_batch(client, name)
                return _finish(client, name, started)
        finally:
            client.close()
    _announce(failed)
    say(f"no broker configured: starting a private fleet ({hosts} hosts)")
    with embedded_fleet(hosts, concurrency=concurrency) as client, client.broker_errors():
        name = batch_api.submit_batch(client, plan, failed=failed)
        watch_batch(client, name)
        return _finish(client, name, started)


def _settings() -> FleetSettings:
    try:
        return FleetSettings.from_env()
    except ValueError as exc:
        raise FleetSettingsError(f"invalid fleet settings: {mask_urls_in(str(exc))}") from exc


def cmd_run(args: argparse.Namespace) -> int:
    return run_batch(args.manifest, hosts=args.hosts, concurrency=args.concurrency)


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler.demo import write_demo_batch

    say("building the sample images (cached after the first run) ...")
    manifest = write_demo_batch(args.directory, boot_check=args.boot_check)
    say(f"demo manifest: {manifest}")
    code = run_batch(manifest, hosts=args.hosts, concurrency=args.concurrency)
    # Some demo VMs are broken on purpose: the batch ran as it should if it finished.
    return 0 if code in (0, 1) else code


def _with_client(func: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        client = FleetClient.from_env()
        try:
            with client.broker_errors():
                return int(func(client, args))
        finally:
            client.close()

    return wrapper


@_with_client
def cmd_submit(client: FleetClient, args: argparse.Namespace) -> int:
    name = batch_api.submit_batch(client, args.manifest)
    print(name)
    return 0


@_with_client
def cmd_status(client: FleetClient, args: argparse.Namespace) -> int:
    from scheduler.progress import render_status

    status = batch_api.batch_status(client, args.batch).to_dict()
    print(json.dumps(status, indent=2) if args.json else "\n".join(render_status(status)))
    return 0


@_with_client
def cmd_watch(client: FleetClient, args: argparse.Namespace) -> int:
    watch_batch(client, args.batch)
    return _finish(client, args.batch, time.monotonic())


@_with_client
def cmd_cancel(client: FleetClient, args: argparse.Namespace) -> int:
    cancelled = batch_api.cancel_batch(client, args.batch)
    print(f"cancelled {len(cancelled)} VMs: {', '.join(cancelled) or '-'}")
    return 0


@_with_client
def cmd_resume(client: FleetClient, args: argparse.Namespace) -> int:
    again = batch_api.resume_batch(client, args.batch)
    print(f"resumed {len(again)} VMs: {', '.join(again) or '-'}")
    return 0


@_with_client
def cmd_report(client: FleetClient, args: argparse.Namespace) -> int:
    summary = batch_api.batch_report(client, args.batch)
    print(json.dumps(summary, indent=2) if args.json else render_markdown(summary))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text(args.document))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmcraft-tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        return p

    p = add("inspect", cmd_inspect, "inspect one disk image on the fleet")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    for name, func, help_text in (
        ("run", cmd_run, "run a batch to the end, with live progress and reports"),
        ("demo", cmd_demo, "build a sample batch of realistic images and run it"),
    ):
        p = add(name, func, help_text)
        if name == "run":
            p.add_argument("manifest")
        else:
            p.add_argument("--directory", default="vmcraft-demo", help="where the demo goes")
            p.add_argument(
                "--no-boot-check",
                dest="boot_check",
                action="store_false",
                help="skip booting the migrated guests (about a minute each under TCG)",
            )
        p.add_argument("--hosts", type=int, default=2, help="simulated hosts without a broker")
        p.add_argument("--concurrency", type=int, default=2, help="worker processes per host")
    add("submit", cmd_submit, "queue a batch on the configured fleet").add_argument("manifest")
    for name, func, help_text in (
        ("status", cmd_status, "show where every VM of a batch stands"),
        ("watch", cmd_watch, "follow a batch until it ends"),
        ("cancel", cmd_cancel, "cancel every VM of a batch that has not ended"),
        ("resume", cmd_resume, "run again what did not finish"),
        ("report", cmd_report, "write the batch reports again and print the summary"),
    ):
        p = add(name, func, help_text)
        p.add_argument("batch")
        if name in ("status", "report"):
            p.add_argument("--json", action="store_true")
    p = add("schema", cmd_schema, "print the JSON Schema of the manifest or of a VM report")
    p.add_argument("document", choices=sorted(SCHEMAS))
    return parser


def _fail(message: str, code: int) -> int:
    """One line on stderr: messages quote guest text and server replies, so newlines
    are folded and every URL's password is masked here, whoever wrote the message."""
    say("vmcraft-tasks: " + for_terminal(mask_urls_in(message)))
    return code


def _configured_broker() -> str:
    try:
        return FleetSettings.from_env().broker_url
    except ValueError:
        return f"{DEFAULT_REDIS}/0"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ManifestError as exc:
        # One problem per line, by design: a manifest is fixed all at once.
        say(mask_urls_in(f"vmcraft-tasks: invalid manifest:\n{exc}"))
        return EXIT_UNAVAILABLE
    except (BrokerUnavailableError, FleetSettingsError, batch_api.BatchNotFoundError) as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except JobNotFoundError as exc:
        # KeyError's str() is a repr; say what it means instead.
        return _fail(
            f"no job record {exc.job_id!r} on this fleet (expired, or lost by Redis)",
            EXIT_UNAVAILABLE,
        )
    except (NoHostOnlineError, batch_api.BatchError) as exc:
        return _fail(str(exc), EXIT_FAILED)
    except BROKER_ERRORS as exc:
        # Raised outside a command's broker_errors block (a private fleet starting).
        return _fail(str(BrokerUnavailableError(_configured_broker(), exc)), EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
