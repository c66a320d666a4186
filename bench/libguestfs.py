"""VMCraft against libguestfs: inspect the same disk with virt-inspector and with VMCraft.

    .venv/bin/python -m bench.libguestfs [--quick]

Uses the 10-partition Ubuntu-style disk of bench.end_to_end. Both sides run as a fresh
command, each paying its own start-up (libguestfs boots its appliance, `vmcraft
inspect --json` starts Python, attaches, mounts every filesystem read-only, inspects and
detaches), alternately, and the wall-time ratio of the medians is reported.

libguestfs is never installed by this benchmark: without `virt-inspector` (and
`guestfish`) on PATH it says so in one line and reports {"skipped": reason}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench import common

NAME = "libguestfs"
TOOLS = ("guestfish", "virt-inspector")
COMMAND_TIMEOUT_S = 600


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def vmcraft_argv(image: str) -> list[str]:
    # The console script next to this interpreter, else the module it runs.
    script = os.path.join(os.path.dirname(sys.executable), "vmcraft")
    if os.access(script, os.X_OK):
        return [script, "inspect", "--json", image]
    return [sys.executable, "-m", "vmcraft_tasks.craft.cli", "inspect", "--json", image]


def virt_inspector_argv(image: str) -> list[str]:
    # Read-only is virt-inspector's default; the format is given so it never guesses.
    return [shutil.which("virt-inspector") or "virt-inspector", "--format=raw", "-a", image]


def _run(argv: list[str]) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {result.returncode}: {result.stderr[-500:]}")
    return result.stdout


def _vmcraft_distros(output: str) -> list[str]:
    return [root.get("distro") for root in json.loads(output)["roots"]]


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    missing = missing_tools()
    if missing:
        reason = f"libguestfs is not installed ({', '.join(missing)} not on PATH): skipped"
        return reason + "\n", {"skipped": reason}

    from vmcraft_tasks.samples.recipes.ten_parts_ubuntu import ten_parts_ubuntu_raw

    image = ten_parts_ubuntu_raw().path
    outputs: dict[str, str] = {}

    def timed_command(name: str, argv: list[str]) -> float:
        def call() -> None:
            outputs[name] = _run(argv)

        return common.timed(call)

    variants: dict[str, Callable[[], float]] = {
        "virt-inspector": lambda: timed_command("virt-inspector", virt_inspector_argv(image)),
        "vmcraft inspect --json": lambda: timed_command("vmcraft", vmcraft_argv(image)),
    }
    for variant in variants.values():
        variant()  # warm-up: page cache, libguestfs's appliance cache
    series = common.alternate(variants, 2 if quick else 5)
    lg, vc = series["virt-inspector"], series["vmcraft inspect --json"]
    rows = [[s.name, s.median, s.low, s.high] for s in (lg, vc)]
    text = common.table(
        f"VMCraft against libguestfs: inspect the 10-partition disk ({len(vc.samples)} runs)",
        ["command", "median s", "min s", "max s"],
        rows,
    )
    ratio = lg.median / vc.median
    found = _vmcraft_distros(outputs["vmcraft"])
    agrees = "<name>ubuntu</name>" in outputs["virt-inspector"]
    text += (
        f"\nvirt-inspector / vmcraft wall time: {ratio:.1f}x. VMCraft found {found}; "
        f"virt-inspector's XML names ubuntu: {agrees}.\n"
    )
    data = {
        "image": image,
        "variants": {name: s.to_dict() for name, s in series.items()},
        "ratio_libguestfs_over_vmcraft": ratio,
    }
    return text, data


if __name__ == "__main__":
    text, result = run(quick="--quick" in sys.argv[1:])
    print(text, end="")
    print(f"saved {common.save(NAME, result)}")
