"""Migration reports: one JSON record per VM, a batch summary, and its Markdown form.

Everything but `write_reports` is pure: builders take the pieces the pipeline
already holds and return plain JSON-able dicts with a fixed key order, so two runs
over the same batch give byte-identical files that diff well. The Markdown is
rendered from the summary dict alone, so a summary.json read back later renders
exactly as it did when it was written.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from vmcraft_tasks.craft.render import human_size
from vmcraft_tasks.craft.textsafe import for_markdown_cell
from vmcraft_tasks.jobs import DONE
from vmcraft_tasks.outfiles import FILE_MODE, OutputDir, OutputNameError, vm_id_problem

REPORT_VERSION = 1
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"

Timestamp = float | datetime  # epoch seconds or an aware datetime


class _ToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


Record = Mapping[str, Any] | _ToDict


def _plain(item: Record) -> dict[str, Any]:
    """A library object (Partition, OSInfo, MountResult, ...) or a mapping, as a new dict."""
    if isinstance(item, Mapping):
        return dict(item)
    return item.to_dict()


def _seconds(value: float, what: str) -> float:
    # NaN or infinity would be written as bare NaN, which is not JSON and breaks
    # every consumer (jq, browsers) of the report; a negative time is a clock bug.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}: not a number of seconds: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: bad duration {value!r}")
    # Millisecond precision: finer digits are noise and make reports churn.
    return round(float(value), 3)


def disk_entry(
    *,
    source: str,
    target: str,
    format: str,
    source_format: str | None = None,
    virtual_size: int | None = None,
    source_size: int | None = None,
    target_size: int | None = None,
    conversion_s: float | None = None,
    source_identity: str | None = None,
    source_unchanged: bool | None = None,
) -> dict[str, Any]:
    """One converted disk.

    `source_identity` is whatever proved the source untouched (a checksum, or
    size+mtime+inode); `source_unchanged` says whether it matched after conversion
    (None: not checked). Sizes are bytes: allocated on the host for source/target.
    """
    return {
        "source": source,
        "source_format": source_format,
        "target": target,
        "format": format,
        "virtual_size": virtual_size,
        "source_size": source_size,
        "target_size": target_size,
        "conversion_s": None
        if conversion_s is None
        else _seconds(conversion_s, f"disk {source} conversion"),
        "source_identity": source_identity,
        "source_unchanged": source_unchanged,
    }


def fix_entry(
    *,
    name: str,
    before: Any,
    after: Any,
    target: str | None = None,
    applied: bool = True,
    note: str | None = None,
) -> dict[str, Any]:
    """One change made to the guest (fstab line, bootloader entry, driver, ...)."""
    return {
        "name": name,
        "target": target,
        "applied": applied,
        "before": before,
        "after": after,
        "note": note,
    }


def _mount_entry(value: str | Record) -> dict[str, Any]:
    if isinstance(value, str):
        return {"strategy": value}
    return _plain(value)


def vm_report(
    *,
    vm_id: str,
    status: str,
    error: str | None = None,
    host: str | None = None,
    timings: Mapping[str, float] | None = None,
    disks: Sequence[Mapping[str, Any]] = (),
    partitions: Sequence[Record] = (),
    filesystems: Sequence[Record] = (),
    mounts: Mapping[int | str, str | Record] | None = None,
    os_facts: Sequence[Record] = (),
    fixes: Sequence[Mapping[str, Any]] = (),
    libvirt_xml: str | None = None,
    data_only: bool = False,
    guestcaps: Mapping[str, Any] | None = None,
    initramfs: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    lvs: Sequence[Record] = (),
    volumes: Sequence[Record] = (),
    scan_notes: Sequence[str] = (),
    boot_check: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of one VM from the pieces its steps produced.

    `timings` maps step name to seconds, in the order the steps ran (kept: the
    pipeline order is the readable one). `mounts` maps partition number to the
    strategy name or the mount result; `os_facts` are `OSInfo` objects or dicts.
    """
    if not vm_id:
        raise ValueError("vm_id is empty")
    if not status:
        raise ValueError(f"{vm_id}: status is empty")
    steps = {step: _seconds(s, f"{vm_id} step {step}") for step, s in (timings or {}).items()}
    return {
        "report_version": REPORT_VERSION,
        "vm_id": vm_id,
        "status": status,
        "error": error,
        "host": host,
        "timings": steps,
        # None, not 0, when no step ran: a VM cancelled while queued took no time
        # worth averaging into the batch medians.
        "total_s": round(sum(steps.values()), 3) if steps else None,
        "disks": [dict(d) for d in disks],
        "partitions": [_plain(p) for p in partitions],
        "filesystems": [_plain(f) for f in filesystems],
        # JSON object keys are strings; sorting numerically keeps partition 10 after 9.
        "mounts": {
            str(n): _mount_entry(m)
            for n, m in sorted((mounts or {}).items(), key=lambda kv: _partition_key(kv[0]))
        },
        "lvs": [_plain(lv) for lv in lvs],
        "volumes": [_plain(v) for v in volumes],
        "scan_notes": list(scan_notes),
        "os": [_plain(o) for o in os_facts],
        "fixes": [dict(f) for f in fixes],
        # Devices the domain got and why (compatibility mode reasons included).
        "guestcaps": dict(guestcaps) if guestcaps else None,
        # Per kernel: generator, module lists before and after, the kept old image.
        "initramfs": dict(initramfs) if initramfs else None,
        "data_only": data_only,
        "notes": list(notes),
        "libvirt_xml": libvirt_xml,
        # The headless boot of the migrated disks (options.boot_check), or None.
        "boot_check": dict(boot_check) if boot_check else None,
    }


def _partition_key(number: int | str) -> tuple[int, str]:
    text = str(number)
    return (int(text), "") if text.isdigit() else (1 << 30, text)


def _iso(ts: Timestamp) -> str:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            # A naive datetime is ambiguous across hosts in other zones.
            raise ValueError(f"naive datetime {ts!r}: give an aware one (UTC)")
        moment = ts.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(ts: Timestamp) -> float:
    return ts.timestamp() if isinstance(ts, datetime) else float(ts)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "sum_s": round(sum(values), 3),
        "median_s": round(statistics.median(values), 3) if values else None,
        "max_s": round(max(values), 3) if values else None,
    }


def _os_label(os_facts: Iterable[Mapping[str, Any]]) -> str | None:
    labels = []
    for root in os_facts:
        if root.get("product_name"):
            labels.append(str(root["product_name"]))
        elif root.get("distro"):
            version = ".".join(str(root[k]) for k in ("major", "minor") if root.get(k) is not None)
            labels.append(f"{root['distro']} {version}".strip())
        elif root.get("type"):
            labels.append(str(root["type"]))
    return "; ".join(labels) or None


def _devices_label(caps: Mapping[str, Any] | None) -> str | None:
    if not caps:
        return None
    label = f"{caps.get('block_bus')}/{caps.get('net_model')}"
    compatibility = caps.get("block_bus") != "virtio" or caps.get("net_model") != "virtio"
    return label + (" (compatibility)" if compatibility else "")


def _reason(report: Mapping[str, Any]) -> str | None:
    if report.get("error"):
        return str(report["error"])
    if report["status"] != DONE:
        return f"ended {report['status']} without a reason"
    return None


def _row(report: Mapping[str, Any]) -> dict[str, Any]:
    disks = report.get("disks") or []
    sizes = [d.get("virtual_size") for d in disks]
    fixes = report.get("fixes") or []
    return {
        "vm_id": report["vm_id"],
        "status": report["status"],
        "host": report.get("host"),
        "os": "data-only" if report.get("data_only") else _os_label(report.get("os") or []),
        "devices": _devices_label(report.get("guestcaps")),
        "disks": len(disks),
        "lvs": len(report.get("lvs") or []),
        "lvs_unexposed": sum(1 for lv in report.get("lvs") or [] if lv.get("reason")),
        # Only a total over every disk: a partial sum would understate the VM.
        "disk_bytes": sum(s for s in sizes if s is not None)
        if sizes and None not in sizes
        else None,
        "fixes": len(fixes),
        "fixes_applied": sum(1 for f in fixes if f.get("applied", True)),
        "total_s": report.get("total_s"),
        "reason": _reason(report),
        "boot": _boot_label(report.get("boot_check")),
    }


def _boot_label(check: Mapping[str, Any] | None) -> str | None:
    """`pass 74 s (tcg, direct-kernel)`, `fail: emergency-mode`, `skipped` (pure)."""
    if not check:
        return None
    result = str(check.get("result"))
    if result == "pass":
        how = ", ".join(str(v) for v in (check.get("accel"), check.get("mode")) if v)
        seconds = check.get("seconds")
        timed = f" {seconds:.0f} s" if isinstance(seconds, int | float) else ""
        return f"pass{timed}" + (f" ({how})" if how else "")
    return f"{result}: {check['reason']}" if check.get("reason") else result


def batch_summary(
    batch_id: str,
    vm_reports: Sequence[Mapping[str, Any]],
    started_at: Timestamp,
    finished_at: Timestamp,
) -> dict[str, Any]:
    """Counts, timings and failures over the `vm_report`s of one batch.

    Per-step statistics cover the VMs that ran the step; steps keep the order in
    which they first appear, which is the pipeline's order.
    """
    ids = [r["vm_id"] for r in vm_reports]
    duplicates = sorted(vm for vm, n in Counter(ids).items() if n > 1)
    if duplicates:
        # Two reports for one VM would overwrite each other's <vm>.json.
        raise ValueError(f"batch {batch_id}: VMs reported twice: {', '.join(duplicates)}")
    per_step: dict[str, list[float]] = {}
    for report in vm_reports:
        for step, seconds in (report.get("timings") or {}).items():
            per_step.setdefault(step, []).append(float(seconds))
    totals = [float(r["total_s"]) for r in vm_reports if r.get("total_s") is not None]
    # Sorted by VM id, not completion order, so reruns of a batch diff cleanly.
    rows = sorted((_row(r) for r in vm_reports), key=lambda row: row["vm_id"])
    return {
        "report_version": REPORT_VERSION,
        "batch_id": batch_id,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "wall_s": round(max(0.0, _epoch(finished_at) - _epoch(started_at)), 3),
        "counts": {
            "total": len(vm_reports),
            "by_status": dict(sorted(Counter(r["status"] for r in vm_reports).items())),
        },
        "timings": {
            "total": _stats(totals),
            "steps": {step: _stats(values) for step, values in per_step.items()},
        },
        "failures": [
            {
                "vm_id": row["vm_id"],
                "status": row["status"],
                "host": row["host"],
                "reason": row["reason"],
            }
            for row in rows
            if row["status"] != DONE
        ],
        "vms": rows,
    }


# --- Markdown ---------------------------------------------------------------------


# The widest a cell gets: a reason may quote a whole generator log; the JSON keeps it.
MAX_CELL = 300


def _cell(value: Any, empty: str = "-") -> str:
    """Text safe inside one Markdown table cell, and on the terminal `run` prints it to.

    Guest text reaches these cells (OS names from os-release, failure reasons quoting
    guest files): `for_markdown_cell` makes it one line, escapes control characters,
    Markdown and HTML, and doubles backslashes before escaping pipes, so an escaped
    pipe is never un-escaped by a backslash the text itself ended with.
    """
    if value is None or value == "":
        return empty
    return for_markdown_cell(value, max_len=MAX_CELL)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _disks_cell(row: Mapping[str, Any]) -> str:
    text = str(row["disks"])
    if row["disk_bytes"] is not None:
        text += f" ({human_size(row['disk_bytes'])})"
    if row.get("lvs"):
        text += f", {row['lvs']} LVs"
        if row.get("lvs_unexposed"):
            text += f" ({row['lvs_unexposed']} not exposed)"
    return text


def _fixes_cell(row: Mapping[str, Any]) -> str:
    if row["fixes_applied"] == row["fixes"]:
        return str(row["fixes"])
    return f"{row['fixes_applied']} of {row['fixes']}"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The batch summary as Markdown: headline counts, a VM table, a per-step timing table."""
    counts = summary["counts"]
    by_status = ", ".join(f"{n} {_cell(status)}" for status, n in counts["by_status"].items())
    lines = [
        f"# Batch {_cell(summary['batch_id'])}",
        "",
        f"Started {_cell(summary['started_at'])}, finished {_cell(summary['finished_at'])} "
        f"(wall time {_duration(summary['wall_s'])}).",
        "",
        f"**{counts['total']} VMs**" + (f": {by_status}." if by_status else "."),
        "",
        "## VMs",
        "",
    ]
    # The boot column only when some VM was boot-checked (options.boot_check).
    booted = any(row.get("boot") for row in summary["vms"])
    header = ("VM", "status", "host", "OS", "devices", "disks", "fixes", "time")
    lines += _table(
        (*header, *(("boot",) if booted else ()), "reason"),
        (
            (
                _cell(row["vm_id"]),
                _cell(row["status"]),
                _cell(row["host"]),
                _cell(row["os"]),
                _cell(row.get("devices")),
                _disks_cell(row),
                _fixes_cell(row),
                _duration(row["total_s"]),
                *((_cell(row.get("boot")),) if booted else ()),
                _cell(row["reason"], empty=""),
            )
            for row in summary["vms"]
        ),
    )
    timings = summary["timings"]
    lines += ["", "## Time per step", ""]
    step_rows = [
        (
            _cell(step),
            str(stats["count"]),
            _duration(stats["sum_s"]),
            _duration(stats["median_s"]),
            _duration(stats["max_s"]),
        )
        for step, stats in timings["steps"].items()
    ]
    total = timings["total"]
    step_rows.append(
        (
            "**all steps**",
            str(total["count"]),
            _duration(total["sum_s"]),
            _duration(total["median_s"]),
            _duration(total["max_s"]),
        )
    )
    lines += _table(("step", "VMs", "total", "median", "max"), step_rows)
    return "\n".join(lines) + "\n"


# --- Files ------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def report_filename(vm_id: str) -> str:
    """`<vm>.json` for a VM id, made safe as one file name (no '/', no hidden files)."""
    stem = _UNSAFE_NAME.sub("_", vm_id)
    # A leading dot would hide the file, and "." / ".." are not files at all.
    stem = re.sub(r"^\.", "_", stem)
    return f"{stem}.json"


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _report_names(vm_reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """`<vm>.json` per report, checked before anything is written, so a clash cannot
    leave half a set."""
    names: dict[str, str] = {}
    for report in vm_reports:
        vm_id = str(report["vm_id"])
        name = report_filename(vm_id)
        reserved = vm_id_problem(vm_id)
        if reserved:
            raise OutputNameError(f"VM id {reserved}")
        if name in (SUMMARY_JSON, SUMMARY_MD) or name in names:
            other = names.get(name, name)
            raise OutputNameError(f"VM {vm_id!r} would overwrite the file of {other!r}")
        names[name] = vm_id
    return list(names)


def write_reports(
    directory: str,
    vm_reports: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    *,
    roots: Sequence[str],
) -> list[str]:
    """Write `<vm>.json` for every report, then summary.json and summary.md; return the paths.

    `directory` must be an allowed output folder under `roots` (see
    `outfiles.check_output_dir`); it is created 0750 when missing, files are 0640. A file
    there that the tool did not make is never replaced: OutputError names it and nothing
    is written. The summary goes last: its presence means every VM file beside it is
    complete.
    """
    files = [
        (name, _json_text(report), "report")
        for name, report in zip(_report_names(vm_reports), vm_reports, strict=True)
    ]
    files += [
        (SUMMARY_JSON, _json_text(summary), "summary"),
        (SUMMARY_MD, render_markdown(summary), "summary"),
    ]
    with OutputDir.open(directory, roots) as out:
        for name, _, _ in files:
            out.require_replaceable(name)
        return [out.write_text(name, text, mode=FILE_MODE, kind=kind) for name, text, kind in files]
