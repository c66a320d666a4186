"""Chaos fixtures: a fleet of three real workers on a Redis the test can restart.

Each test gets its own redis-server (with an AOF unless asked otherwise) and its own
hosts `h1`, `h2`, `h3`; everything is stopped, by id, when the test ends. Faults are
injected only into processes the test started: workers by their pid (and the process
group this harness created for them), Redis by its own SHUTDOWN, qemu-img by the pids
the test found working on its own temporary files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis import Redis

from scheduler.batch import BatchStatus, batch_status, submit_batch
from scheduler.submit import FleetClient
from tests import leaks
from vmcraft_tasks import keys
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from vmcraft_tasks.embedded.fleet import Fleet, kill_group
from vmcraft_tasks.embedded.redis import ManagedRedis
from vmcraft_tasks.samples.toolkit import sha256_file
from worker import procs
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore

HOSTS = ("h1", "h2", "h3")
MiB = 1024 * 1024

# A real qemu-img, throttled for `convert` only when the variable is set: a test can act
# while conversions run. The shell replaces itself with qemu-img (exec), so the process
# is qemu-img with exactly the fleet's arguments (plus the rate limit).
WRAPPER = """#!/bin/sh
if [ "$1" = convert ] && [ -n "$VMCRAFT_TEST_CONVERT_RATE" ]; then
  shift
  exec {real} convert -r "$VMCRAFT_TEST_CONVERT_RATE" "$@"
fi
exec {real} "$@"
"""


@dataclass
class Chaos:
    """One test's fleet, its Redis and a client, plus what the test measured."""

    fleet: Fleet
    redis: ManagedRedis
    client: FleetClient
    root: Path
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> Redis:  # `redis` here is the field, not the module
        return redis.Redis.from_url(self.redis.url(0), decode_responses=True)

    # -- batches -------------------------------------------------------------------

    def submit(self, directory: Path, batch: str, vms: list[dict[str, Any]], **extra: Any) -> str:
        manifest = directory / f"{batch}.yaml"
        manifest.write_text(yaml.safe_dump({"batch": batch, "vms": vms, **extra}))
        return submit_batch(self.client, str(manifest))

    def status(self, batch: str) -> BatchStatus | None:
        """The batch's status, or None while Redis cannot answer."""
        try:
            return batch_status(self.client, batch)
        except (redis.RedisError, OSError):
            return None

    def wait_finished(self, batch: str, timeout_s: float) -> BatchStatus:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            status = self.status(batch)
            if status is not None:
                last = status
                if status.finished:
                    return status
            time.sleep(0.25)
        detail = last.to_dict() if last else "no answer from Redis"
        raise AssertionError(
            f"batch {batch} not finished after {timeout_s} s: {detail}\n{self.logs()}"
        )

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                value = predicate()
                if value:
                    return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{self.logs()}")

    def jobs_where(
        self, batch: str, *, host: str | None = None, status: str | None = None
    ) -> list[str]:
        found = []
        vm_ids: list[str] = self.client.state.lrange(keys.batch_vms_key(batch), 0, -1)  # type: ignore[assignment]
        for vm in vm_ids:
            job_id = f"{batch}.{vm}"
            with contextlib.suppress(KeyError):
                record = self.client.jobs.get(job_id)
                if (host is None or record.host == host) and (
                    status is None or record.status == status
                ):
                    found.append(job_id)
        return found

    # -- faults --------------------------------------------------------------------

    def kill9(self, host: str) -> None:
        """kill -9 the worker's main process, then its orphaned pool processes: a host
        crash. Helpers in their own session (qemu-nbd, nbdfuse, qemu-img) survive."""
        killed = self.fleet.kill9(host)
        kill_group(killed.pid)

    def restart_host(self, host: str) -> None:
        self.fleet.start(host, concurrency=2)
        self.fleet.wait_online([host])

    def logs(self) -> str:
        tails = []
        for log in sorted(self.root.glob("h*.log")):
            tails.append(f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}")
        return "\n".join(tails)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("h*.log")))

    # -- what must be true after every fault --------------------------------------------

    def assert_nothing_left(self, *output_dirs: Path, timeout_s: float = 30.0) -> None:
        """No attach, mount, loop device or helper process of this fleet; no .part file;
        no slot lease or semaphore place in Redis."""

        def leftovers() -> list[str]:
            found = []
            for host in HOSTS:
                found += attach_state_dirs(str(self.fleet.work_root / host))
            snapshot = leaks.snapshot()
            work = str(self.fleet.work_root)
            found += [f"mount {m}" for m in snapshot.mounts if m.startswith(work)]
            found += [f"process {p}" for p in snapshot.helpers if _runs_for(p, work, output_dirs)]
            for directory in output_dirs:
                found += [str(p) for p in directory.rglob("*.part-*")]
            state = self.state
            for host in HOSTS:
                found += [
                    f"{host} lease {o}" for o in SlotLeases(state, host, 4, 5).held().values()
                ]
                for name in ("mounts", "conversions"):
                    sem = RedisSemaphore(state, keys.semaphore_key(host, name), 4, 5)
                    found += [f"{host} {name} {t}" for t in sem.holders()]
            return found

        deadline = time.monotonic() + timeout_s
        found = leftovers()
        while found and time.monotonic() < deadline:
            time.sleep(0.25)
            found = leftovers()
        assert not found, f"left behind: {found}\n{self.logs()}"

    def assert_every_failure_has_a_reason(self, status: BatchStatus) -> None:
        for vm in status.vms:
            assert vm.status in ("done", "failed"), vm.to_dict()
            if vm.status == "failed":
                assert vm.error and len(vm.error) > 10, vm.to_dict()

    def report(self, name: str) -> None:
        """Print what the test measured (run with -s to see it)."""
        print(f"\nCHAOS {name}: {json.dumps(self.figures, sort_keys=True)}")


def _runs_for(helper: str, work: str, output_dirs: tuple[Path, ...]) -> bool:
    pid = int(helper.split(":", 1)[0])
    line = " ".join(procs.cmdline(pid))
    return work in line or any(str(d) in line for d in output_dirs)


@pytest.fixture(scope="session")
def slow_qemu_img(tmp_path_factory: pytest.TempPathFactory) -> Path:
    real = shutil.which("qemu-img") or "/usr/bin/qemu-img"
    directory = tmp_path_factory.mktemp("slow-qemu-img")
    wrapper = directory / "qemu-img"
    wrapper.write_text(WRAPPER.format(real=real))
    wrapper.chmod(0o755)
    return directory


@pytest.fixture
def chaos(tmp_path: Path, slow_qemu_img: Path) -> Iterator[Callable[..., Chaos]]:
    """`chaos(appendonly=True, convert_rate=None, **settings)` starts Redis and h1-h3."""
    made: list[Chaos] = []

    def make(*, appendonly: bool = True, convert_rate: str | None = None, **settings: str) -> Chaos:
        server = ManagedRedis(workdir=tmp_path / "redis", appendonly=appendonly)
        server.start()
        root = tmp_path / "fleet"
        root.mkdir()
        overrides = {k.upper(): v for k, v in settings.items()}
        overrides["PATH"] = f"{slow_qemu_img}:{os.environ['PATH']}"
        if convert_rate:
            overrides["VMCRAFT_TEST_CONVERT_RATE"] = convert_rate
        fleet = Fleet(server=server, work_root=root / "work", log_dir=root, overrides=overrides)
        chaos = Chaos(fleet=fleet, redis=server, client=FleetClient(fleet.settings()), root=root)
        made.append(chaos)
        for host in HOSTS:
            fleet.start(host, concurrency=2)
        fleet.wait_online(list(HOSTS))
        return chaos

    yield make
    for chaos in made:
        chaos.fleet.stop_all()
        with contextlib.suppress(Exception):
            chaos.client.close()
        chaos.redis.stop(keep_data=False)


@pytest.fixture
def data_source(tmp_path: Path, mbr_logical_raw: Any) -> Callable[[str, int], str]:
    """A distinct raw disk (a copy of the MBR sample) with `extra_mib` MiB of random data
    appended after its partitions: conversions of it copy real bytes, at whatever rate
    the fleet's qemu-img is held to."""
    sources = tmp_path / "sources"
    sources.mkdir(exist_ok=True)

    def make(name: str, extra_mib: int = 40) -> str:
        path = sources / f"{name}.raw"
        subprocess.run(["cp", "--sparse=always", mbr_logical_raw.path, str(path)], check=True)
        with open(path, "ab") as fh:
            for _ in range(extra_mib):
                fh.write(os.urandom(MiB))
        return str(path)

    return make


def checksums(paths: list[str]) -> dict[str, str]:
    return {p: sha256_file(p) for p in paths}
