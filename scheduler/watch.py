"""Follow a batch until it ends, redrawing its progress."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

import redis
from kombu.exceptions import OperationalError

from scheduler.batch import BatchStatus, batch_status
from scheduler.progress import render_status
from scheduler.submit import BrokerUnavailableError, FleetClient
from vmcraft_tasks.craft.textsafe import for_terminal

# A broker that restarts (a failover, an AOF reload: "loading the dataset") is ridden
# out for this long before watch gives up; a wrong password is never retried.
OUTAGE_S = 60.0
_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OperationalError)


def _fit(lines: list[str], tty: bool) -> list[str]:
    """Lines as they may be written: no control characters but the redraw's own, and on
    a terminal none wider than it, so each takes one row and the redraw moves up
    exactly as many rows as it drew."""
    width = shutil.get_terminal_size().columns - 1 if tty else None
    return [for_terminal(line, max_len=width) for line in lines]


def watch_batch(
    client: FleetClient,
    batch: str,
    *,
    out: TextIO = sys.stdout,
    interval_s: float = 0.5,
    timeout_s: float | None = None,
    outage_s: float = OUTAGE_S,
) -> BatchStatus:
    """Print progress until every VM ended (or time runs out); returns the last status.

    On a terminal the block is redrawn in place; otherwise only changed lines print,
    so logs of a CI run stay readable.

    A broker that cannot be reached on the first look raises at once; one that goes
    away later is retried for `outage_s` (one notice line), then raises
    `BrokerUnavailableError`.
    """
    tty = out.isatty()
    drawn = 0
    last: list[str] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = False
    outage_since: float | None = None
    while True:
        try:
            status = batch_status(client, batch)
        except _OUTAGE_ERRORS as exc:
            now = time.monotonic()
            outage_since = now if outage_since is None else outage_since
            if (
                not seen
                or isinstance(exc, redis.AuthenticationError)
                or now - outage_since > outage_s
                or (deadline is not None and now > deadline)
            ):
                raise BrokerUnavailableError(client.settings.broker_url, exc) from exc
            if outage_since == now:  # the first failure of this outage: say it once
                notice = BrokerUnavailableError(client.settings.broker_url, exc)
                # One row, like the status lines, so the redraw's count holds.
                (line,) = _fit([f"{notice}; retrying for up to {outage_s:.0f} s"], tty)
                out.write(line + "\n")
                out.flush()
                # On a terminal the next redraw starts above the notice and clears it.
                drawn += 1 if tty and drawn else 0
            time.sleep(interval_s)
            continue
        seen, outage_since = True, None
        lines = _fit(render_status(status.to_dict()), tty)
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
