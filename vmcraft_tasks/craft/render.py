"""The human-readable inspection report, from its JSON form (pure).

Both `vmcraft inspect` (library, in-process) and `vmcraft-tasks inspect` (through
the fleet) print with this, so the two never drift apart.

Nearly every value here came from the image: labels, UUIDs, os-release names,
hostnames, fstab lines, backing file names, mount errors quoting them. Each goes
through `textsafe.for_terminal` (one line, control characters escaped, bounded), so
the guest cannot write escape sequences or fake lines onto the operator's terminal.
"""

from __future__ import annotations

from typing import Any

from vmcraft_tasks.craft.textsafe import for_terminal

# Widest a single guest value may print; a longer one is cut and ends with "...".
MAX_FIELD = 200


def _t(value: Any, max_len: int = MAX_FIELD) -> str:
    """A value for one line of the terminal report."""
    return for_terminal("" if value is None else value, max_len=max_len)


def human_size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _mount_how(mount: dict[str, Any] | None) -> str:
    if mount is None:
        return "-"
    if not mount["ok"]:
        return f"FAILED: {_t(mount['error'], 400)}"
    how = f"{_t(mount['strategy'])} ({_t(mount['driver'])})"
    if mount.get("stale_view"):
        how += ", STALE pre-journal view"
    if mount.get("journal_replayed"):
        how += ", journal replayed in overlay"
    return how


def _header(report: dict[str, Any]) -> list[str]:
    img = report["image"]
    chain = img.get("backing_chain") or []
    lines = [
        f"image     {_t(img['path'], 1000)}",
        f"format    {_t(img['format'])}, {human_size(img['virtual_size'])}"
        + (f", backing chain: {' -> '.join(_t(link) for link in chain)}" if chain else ""),
    ]
    if "backend" in report:
        mode = "read-only (throw-away overlay)" if report.get("readonly", True) else "read-write"
        lines.append(
            f"attach    {_t(report['backend'])} backend, "
            f"{_t(report['attach_attempts'])} attempt(s), {mode}"
        )
    if report.get("host"):
        lines.append(f"host      {_t(report['host'])}")
    return lines


def _partition_rows(report: dict[str, Any]) -> list[str]:
    rows = [f"{'#':>3}  {'size':>10}  {'type':<8} {'label':<14} {'uuid':<38} mount"]
    fs_by_part = {f["partition"]: f for f in report["filesystems"]}
    mounts = report["mounts"]
    numbers = [p["number"] for p in report["partitions"]] or sorted(fs_by_part)
    sizes = {p["number"]: p["size_sectors"] * p["sector_size"] for p in report["partitions"]}
    for number in numbers:
        fs = fs_by_part.get(number, {})
        size = human_size(sizes[number]) if number in sizes else "whole disk"
        if not fs.get("type") and fs.get("content"):
            # Nothing to mount: say what the partition holds instead of a row of dashes.
            rows.append(f"{_t(number):>3}  {size:>10}  -        {_t(fs['content'], 400)}")
            continue
        rows.append(
            f"{_t(number):>3}  {size:>10}  {_t(fs.get('type') or '-', 40):<8} "
            f"{_t(fs.get('label') or '-', 64):<14} {_t(fs.get('uuid') or '-', 64):<38} "
            f"{_mount_how(mounts.get(str(number)))}"
        )
    return rows


def _root_lines(root: dict[str, Any]) -> list[str]:
    version = f"{root['major']}.{root['minor']}" if root.get("major") is not None else None
    lines = [f"root on partition {_t(root['root_partition'])}: {_t(root['type'])}"]
    for label, value in (
        ("distro", root.get("distro")),
        ("product", root.get("product_name")),
        ("version", version),
        ("arch", root.get("arch")),
        ("hostname", root.get("hostname")),
        ("packages", root.get("package_format")),
    ):
        lines.append(f"  {label:<9} {_t(value) if value is not None else 'unknown'}")
    if root.get("fstab"):
        lines.append("  fstab")
        for entry in root["fstab"]:
            part = entry["resolved_partition"]
            target = (
                f"partition {_t(part)}"
                if part is not None
                else f"not on this disk ({_t(entry['kind'])})"
            )
            lines.append(f"    {_t(entry['spec']):<44} {_t(entry['mountpoint']):<12} -> {target}")
    lines += [f"  note: {_t(note, 1000)}" for note in root.get("notes") or []]
    return lines


def render_report(report: dict[str, Any]) -> str:
    """Text for a report in its JSON form (`DiskReport.to_dict()` or a fleet result)."""
    lines = [*_header(report), "", *_partition_rows(report), ""]
    if not report["roots"]:
        lines.append("no operating system found")
    for root in report["roots"]:
        lines += _root_lines(root)
    if "elapsed_ms" in report:
        lines += ["", f"inspected in {report['elapsed_ms']:.0f} ms"]
    return "\n".join(lines)
