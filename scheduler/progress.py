"""Live batch progress as text (pure): a bar for the batch and one per VM.

Failure reasons quote guest text (a mount error, an fstab line, the initramfs
generator's output), and ids and hosts come from manifests and messages: every value
goes through `textsafe.for_terminal` before it reaches the terminal.
"""

from __future__ import annotations

from typing import Any

from vmcraft_tasks.craft.textsafe import for_terminal

BAR_WIDTH = 24
DETAIL_WIDTH = 90  # a failure reason is cut here: the full one is in the report
ID_WIDTH = 64  # a longer VM id or host would push every bar off the screen

# Where each state sits on a VM's way through the fleet, in percent.
STAGE_START = {
    "queued": 0.0,
    "converting": 0.0,
    "attaching": 52.0,
    "scanning": 56.0,
    "mounting": 60.0,
    "inspecting": 82.0,
    "fixing": 88.0,
    "detaching": 94.0,
    "boot_checking": 96.0,
    "done": 100.0,
    "failed": 100.0,
    "cancelled": 100.0,
}


def vm_percent(status: str, progress: dict[str, Any]) -> float:
    """How far one VM is, from its state and its step counters."""
    if status == "converting":
        return 50.0 * float(progress.get("convert_pct") or 0.0) / 100.0
    if status == "mounting":
        total = int(progress.get("to_mount") or 0)
        done = int(progress.get("mounted") or 0)
        return STAGE_START["mounting"] + (20.0 * done / total if total else 0.0)
    return STAGE_START.get(status, 0.0)


def bar(percent: float, width: int = BAR_WIDTH) -> str:
    filled = round(width * max(0.0, min(percent, 100.0)) / 100.0)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _detail(vm: dict[str, Any]) -> str:
    status, progress = vm["status"], vm.get("progress") or {}
    if status == "converting" and progress.get("convert_pct") is not None:
        disk = int(progress.get("convert_disk") or 0) + 1
        return f"converting disk {disk}: {progress['convert_pct']:.0f}%"
    if status == "mounting" and progress.get("to_mount"):
        return f"mounted {progress.get('mounted') or 0} of {progress['to_mount']}"
    if status == "failed":
        return for_terminal(" ".join((vm.get("error") or "").split()), max_len=DETAIL_WIDTH)
    return ""


def _t(value: Any) -> str:
    return for_terminal(value, max_len=ID_WIDTH)


def render_status(status: dict[str, Any]) -> list[str]:
    """Lines for a `BatchStatus.to_dict()`."""
    vms = status["vms"]
    overall = sum(vm_percent(v["status"], v.get("progress") or {}) for v in vms) / max(len(vms), 1)
    counts = ", ".join(f"{n} {_t(s)}" for s, n in sorted(status["counts"].items()))
    lines = [f"batch {_t(status['batch'])} {bar(overall)} {overall:5.1f}%  {counts}"]
    width = max((len(_t(v["vm"])) for v in vms), default=2)
    for vm in vms:
        pct = vm_percent(vm["status"], vm.get("progress") or {})
        host = _t(vm.get("host") or "-")
        line = (
            f"  {_t(vm['vm']):<{width}} {bar(pct, 16)} {_t(vm['status']):<10} {host:<6} "
            f"{_detail(vm)}"
        )
        lines.append(line.rstrip())
    return lines
