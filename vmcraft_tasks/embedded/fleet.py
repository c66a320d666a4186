"""Real `celery -A vmcraft_tasks worker` processes acting as conversion hosts on one machine.

Each worker starts in its own process group (created here), so a test can stop
or kill exactly the processes it started, by id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.embedded.redis import ManagedRedis, RedisServer
from worker.registry import list_hosts


@dataclass
class HostProcess:
    host: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    server: RedisServer | ManagedRedis
    work_root: Path
    log_dir: Path
    overrides: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, HostProcess] = field(default_factory=dict)

    def env(self, host: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VMCRAFT_BROKER_URL": self.server.url(0),
                "VMCRAFT_RESULT_BACKEND": self.server.url(1),
                "VMCRAFT_CACHE_URL": self.server.url(2),
                "VMCRAFT_WORK_DIR": str(self.work_root),
                "VMCRAFT_HEARTBEAT_S": "1",
                "VMCRAFT_LEASE_TTL_S": "5",
                **self.overrides,
            }
        )
        if host:
            env["VMCRAFT_HOST_ID"] = host
        return env

    def settings(self) -> FleetSettings:
        """Client settings that reach this fleet (its broker, results and cache)."""
        env = self.env()
        return FleetSettings(
            broker_url=env["VMCRAFT_BROKER_URL"],
            result_backend=env["VMCRAFT_RESULT_BACKEND"],
            cache_url=env["VMCRAFT_CACHE_URL"],
        )

    @property
    def state(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url(0), decode_responses=True)

    def start(self, host: str, concurrency: int = 2) -> HostProcess:
        log = self.log_dir / f"{host}-{len(list(self.log_dir.glob(host + '*')))}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "vmcraft_tasks",
                    "worker",
                    "-n",
                    f"{host}@%h",
                    "-c",
                    str(concurrency),
                    "-l",
                    "info",
                    "--without-gossip",
                    "--without-mingle",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(host),
                start_new_session=True,
            )
        worker = HostProcess(host, proc, log)
        self.hosts[host] = worker
        return worker

    def wait_online(self, hosts: list[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.state as client:
            while True:
                online = {h.host_id for h in list_hosts(client) if h.online and h.info}
                ready = all(
                    h in online and self.hosts[h].pid in (_info_pids(client, h)) for h in hosts
                )
                if ready:
                    return
                for h in hosts:
                    if self.hosts[h].proc.poll() is not None:
                        raise RuntimeError(
                            f"worker {h} exited:\n{self.hosts[h].log_text()[-3000:]}"
                        )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers {hosts} not online after {timeout_s} s")
                time.sleep(0.1)

    def stop(self, host: str, timeout_s: float = 60.0) -> None:
        """Warm shutdown (SIGTERM), then make sure the whole process group is gone."""
        worker = self.hosts.pop(host)
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
            try:
                worker.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(timeout=10)
        kill_group(worker.pid)

    def kill9(self, host: str) -> HostProcess:
        """kill -9 the worker's main process only, as a crash would."""
        worker = self.hosts.pop(host)
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait(timeout=10)
        return worker

    def stop_all(self) -> None:
        for host in list(self.hosts):
            self.stop(host)


def _info_pids(client: redis.Redis, host: str) -> tuple[int, ...]:
    for status in list_hosts(client):
        if status.host_id == host and status.info:
            return status.info.pids
    return ()


def kill_group(pgid: int) -> None:
    """The worker's pool children share its process group, which this harness created."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
