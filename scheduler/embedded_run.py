"""`vmcraft-tasks run` without a broker: a private Redis and local workers, then gone."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from scheduler.submit import FleetClient
from vmcraft_tasks.embedded.fleet import Fleet
from vmcraft_tasks.embedded.redis import redis_server


@contextmanager
def embedded_fleet(
    hosts: int = 2, *, concurrency: int = 2, log_dir: str | None = None
) -> Iterator[FleetClient]:
    """A private redis-server and `hosts` local workers (h1, h2, ...); everything it
    started is stopped, by id, when the block ends."""
    work = tempfile.mkdtemp(
        prefix="vmcraft-run-", dir="/run" if os.access("/run", os.W_OK) else None
    )
    names = [f"h{i}" for i in range(1, hosts + 1)]
    with redis_server() as server:
        fleet = Fleet(
            server=server,
            work_root=Path(work) / "work",
            log_dir=Path(log_dir or work),
            overrides={"VMCRAFT_HEARTBEAT_S": "2", "VMCRAFT_LEASE_TTL_S": "30"},
        )
        client = None
        try:
            for name in names:
                fleet.start(name, concurrency=concurrency)
            fleet.wait_online(names)
            client = FleetClient(fleet.settings())
            yield client
        finally:
            if client is not None:
                client.close()
            fleet.stop_all()
            shutil.rmtree(work, ignore_errors=True)


def broker_configured() -> bool:
    return bool(os.environ.get("VMCRAFT_BROKER_URL"))


def say(message: str, out: TextIO = sys.stderr) -> None:
    print(message, file=out, flush=True)
