"""A real redis-server on a free loopback port, started and stopped by the tests.

`redis_server()` is a throw-away server without persistence. `ManagedRedis` is one a
test can stop and start again on the same port, with its AOF (a restart that keeps
the data) or without (a restart that comes back empty), as an operator's restart
would: the fleet's chaos tests use it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RedisServer:
    port: int
    pid: int

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir = tempfile.mkdtemp(prefix="vmcraft-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(proc, port)
        yield RedisServer(port=port, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                # A server still loading its AOF answers -LOADING: not ready yet.
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)


@dataclass
class ManagedRedis:
    """A redis-server on a fixed loopback port that can be stopped and started again.

    With `appendonly`, every write goes to an AOF (fsync every second, as in
    production) and a clean stop flushes it, so a restart keeps the data.
    """

    workdir: Path
    appendonly: bool = True
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server already running")
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.appendonly
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
                # The coordination store must never evict (README: "Running a fleet").
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ready(self.proc, self.port)

    def stop(self, *, keep_data: bool = True) -> None:
        """Stop the server: SHUTDOWN (the AOF is flushed), or, without `keep_data`,
        SHUTDOWN NOSAVE and its files removed, so the next start comes back empty."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        command = b"SHUTDOWN\r\n" if keep_data else b"SHUTDOWN NOSAVE\r\n"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                conn.sendall(command)
                conn.recv(64)
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if not keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, *, down_s: float, keep_data: bool = True) -> tuple[float, float]:
        """Stop, stay down `down_s`, start again; returns (went down, came back) as
        time.monotonic() values."""
        self.stop(keep_data=keep_data)
        went_down = time.monotonic()
        time.sleep(down_s)
        self.start()
        return went_down, time.monotonic()


@contextmanager
def managed_redis(*, appendonly: bool = True) -> Iterator[ManagedRedis]:
    workdir = Path(tempfile.mkdtemp(prefix="vmcraft-redis-"))
    server = ManagedRedis(workdir=workdir, appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop(keep_data=False)
        shutil.rmtree(workdir, ignore_errors=True)
