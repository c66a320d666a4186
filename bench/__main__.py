"""Run every benchmark, alternating variants, and print their tables.

    python -m bench [--quick] [NAME ...]      (names: see BENCHMARKS)

Tables go to stdout (Markdown), each benchmark's data to bench/results/<name>.json,
and all tables together to bench/results/report.md.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback

from bench.common import RESULTS_DIR, machine_facts, save

BENCHMARKS = [
    ("parallel_mounts", "1. Parallel mounts"),
    ("caching", "2. Caching"),
    ("attach_retry", "3. Attach retry"),
    ("mount_fallback", "4. Mount fallback"),
    ("end_to_end", "5. End to end"),
    ("libguestfs", "6. Against libguestfs"),
    ("lvm", "7. LVM guests"),
    ("boot_check", "8. Boot check"),
]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    wanted = [a for a in argv if not a.startswith("-")] or [name for name, _ in BENCHMARKS]
    facts = machine_facts()
    header = (
        f"# vmcraft-tasks benchmarks\n\n{facts['date']}; {facts['cores']} cores; kernel "
        f"{facts['kernel']}; Python {facts['python']}; attach backend {facts['backend']}"
        f"{'; quick mode' if quick else ''}\n"
    )
    print(header, flush=True)
    sections = [header]
    failed = []
    for name, title in BENCHMARKS:
        if name not in wanted:
            continue
        started = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
            text, data = module.run(quick=quick)
        except Exception:
            failed.append(name)
            text, data = f"failed:\n```\n{traceback.format_exc()}```\n", {"failed": True}
        section = f"## {title}\n\n{text}\n_({time.monotonic() - started:.0f} s)_\n"
        print(section, flush=True)
        sections.append(section)
        save(name, data)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "report.md"), "w") as fh:
        fh.write("\n".join(sections))
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
