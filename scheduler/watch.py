"""Follow a batch until it ends, redrawing its progress."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from scheduler.batch import BatchStatus, batch_status
from scheduler.progress import render_status
from scheduler.submit import FleetClient


def watch_batch(
    client: FleetClient,
    batch: str,
    *,
    out: TextIO = sys.stdout,
    interval_s: float = 0.5,
    timeout_s: float | None = None,
) -> BatchStatus:
    """Print progress until every VM ended (or time runs out); returns the last status.

    On a terminal the block is redrawn in place; otherwise only changed lines print,
    so logs of a CI run stay readable.
    """
    tty = out.isatty()
    drawn = 0
    last: list[str] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = batch_status(client, batch)
        lines = render_status(status.to_dict())
        if tty:
            if drawn:
                out.write(f"\x1b[{drawn}F\x1b[J")
            out.write("\n".join(lines) + "\n")
            drawn = len(lines)
        else:
            for line in lines:
                if line not in last:
                    out.write(line + "\n")
            last = lines
        out.flush()
        if status.finished or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(interval_s)
