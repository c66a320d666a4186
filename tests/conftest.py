"""Shared fixtures: a private work directory and a leak check after every test."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests import leaks
from vmcraft_tasks.embedded.redis import RedisServer, redis_server

pytest_plugins = ["tests.conftest_images", "tests.conftest_bootable"]


@pytest.fixture(scope="session", autouse=True)
def private_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Attach state of the whole run lives in one private directory."""
    work = str(tmp_path_factory.mktemp("vmcraft-work"))
    leaks.set_scope(str(tmp_path_factory.getbasetemp()), work)
    old = os.environ.get("VMCRAFT_WORK_DIR")
    os.environ["VMCRAFT_WORK_DIR"] = work
    yield work
    leftovers = [d for d in os.listdir(work) if d.startswith("attach-")]
    assert not leftovers, f"attach state left behind in {work}: {leftovers}"
    if old is None:
        os.environ.pop("VMCRAFT_WORK_DIR", None)
    else:
        os.environ["VMCRAFT_WORK_DIR"] = old


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test after which a mount, loop device or helper process of ours remains."""
    before = leaks.snapshot()
    yield
    # Daemonised FUSE drivers exit a moment after their unmount returns.
    deadline = time.monotonic() + 2.0
    while True:
        found = leaks.snapshot().new_since(before)
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not found, f"{request.node.nodeid} leaked: {found}"


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free loopback port."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_srv: RedisServer) -> Iterator[str]:
    """A clean database for one test."""
    import redis

    url = redis_srv.url(0)
    client = redis.Redis.from_url(url)
    client.flushall()
    yield url
    client.flushall()
    client.close()
