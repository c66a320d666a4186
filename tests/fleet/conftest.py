"""Fleet fixtures: a private redis-server and real workers acting as hosts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmcraft_tasks.embedded.fleet import Fleet
from vmcraft_tasks.embedded.redis import redis_server


@pytest.fixture(scope="module")
def fleet_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Fleet]]:
    """Start a fleet with its own Redis; everything is stopped when the module ends."""
    started: list[Fleet] = []
    servers = []

    def make(hosts: list[str], concurrency: int = 2, **overrides: str) -> Fleet:
        server_cm = redis_server()
        server = server_cm.__enter__()
        servers.append(server_cm)
        root = tmp_path_factory.mktemp("fleet")
        fleet = Fleet(
            server=server,
            work_root=root / "work",
            log_dir=root,
            overrides={k.upper(): v for k, v in overrides.items()},
        )
        started.append(fleet)
        for host in hosts:
            fleet.start(host, concurrency=concurrency)
        fleet.wait_online(hosts)
        return fleet

    yield make
    for fleet in started:
        fleet.stop_all()
    for server_cm in servers:
        server_cm.__exit__(None, None, None)


@pytest.fixture
def overlay(tmp_path: Path) -> Callable[[str], str]:
    """A fresh qcow2 on top of a sample image: a distinct disk (own identity) in milliseconds.

    The base is first copied (sparsely: milliseconds) next to the overlays: workers
    accept a backing file only inside the image's own directory or image roots.
    """
    count = 0
    bases: dict[str, str] = {}

    def make(base: str) -> str:
        nonlocal count
        count += 1
        if base not in bases:
            local = tmp_path / f"base{len(bases):02d}-{os.path.basename(base)}"
            subprocess.run(["cp", "--sparse=always", base, str(local)], check=True)
            bases[base] = str(local)
        top = tmp_path / f"vm{count:02d}.qcow2"
        fmt = "qcow2" if base.endswith(".qcow2") else "raw"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                os.path.basename(bases[base]),
                "-F",
                fmt,
                str(top),
            ],
            check=True,
            cwd=tmp_path,
        )
        return str(top)

    return make
