"""`vmcraft-tasks` against a broken fleet: one line on stderr, exit 2, no traceback and
no password, for every command.

Real processes against real ports: a closed port, a real redis-server without the
batch, one that requires a password, one that lost its data, and a listener that is
not Redis. No worker runs here: none of these answers needs one.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml

from scheduler import batch as batch_api
from scheduler.batch import BatchError, BatchNotFoundError
from scheduler.manifest import load_manifest
from scheduler.submit import BrokerUnavailableError, FleetClient
from scheduler.watch import watch_batch
from vmcraft_tasks import keys
from vmcraft_tasks.batches import BatchStore, job_id_for
from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.embedded.redis import free_port
from vmcraft_tasks.jobs import JobStore

SECRET = "s3cret-Pw-0123456789abcdefXYZ"
BATCH_COMMANDS = ("status", "watch", "cancel", "resume", "report")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of two real (empty) raw disks: valid, so every command gets as far as
    the broker."""
    root = tmp_path_factory.mktemp("cli-errors")
    for name in ("web01", "web02"):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "raw", str(root / f"{name}.raw"), "16M"],
            check=True,
        )
    manifest = {
        "batch": "b1",
        "vms": [{"id": n, "disks": [str(root / f"{n}.raw")]} for n in ("web01", "web02")],
    }
    (root / "batch.yaml").write_text(yaml.safe_dump(manifest))
    return root


def command_lines(images: Path, batch: str = "nope") -> dict[str, list[str]]:
    """Every fleet subcommand, with valid arguments."""
    lines = {
        "submit": ["submit", str(images / "batch.yaml")],
        "run": ["run", str(images / "batch.yaml")],
        "inspect": ["inspect", str(images / "web01.raw")],
    }
    for name in BATCH_COMMANDS:
        lines[name] = [name, batch]
    lines["status --json"] = ["status", batch, "--json"]
    lines["report --json"] = ["report", batch, "--json"]
    return lines


ALL_COMMANDS = ("submit", "run", "inspect", *BATCH_COMMANDS, "status --json", "report --json")


def cli(
    broker: str, *args: str, work_dir: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCRAFT_")}
    env.update(VMCRAFT_BROKER_URL=broker, VMCRAFT_WORK_DIR=work_dir, **settings)
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("vmcraft-tasks: "), line
    assert proc.stdout == "", proc.stdout
    assert proc.returncode == code, (proc.returncode, line)
    assert SECRET not in line
    for word in words:
        assert word in line, line
    return line


@dataclass
class AuthRedis:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: str

    def url(self, db: int = 0, password: str | None = SECRET) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), decode_responses=True)

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


def start_auth_redis(port: int, workdir: str) -> AuthRedis:
    """A redis-server that requires SECRET and keeps its data (AOF) across restarts."""
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", workdir),
            *("--appendonly", "yes", "--save", "", "--requirepass", SECRET),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = AuthRedis(port, proc, workdir)
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.client().ping():
                return server
        except redis.RedisError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)


@pytest.fixture
def auth_redis() -> Iterator[AuthRedis]:
    workdir = tempfile.mkdtemp(prefix="vmcraft-authredis-")
    server = start_auth_redis(free_port(), workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def not_redis() -> Iterator[int]:
    """A listener that answers like an HTTP server, as a proxy in the way would."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def fleet_client(url: str) -> FleetClient:
    return FleetClient(FleetSettings(broker_url=url, result_backend=url, cache_url=url))


def record_batch(url: str, images: Path, *, drop_job: str | None = None) -> None:
    """Batch b1 as `submit` records it (without a worker to start it: both VMs are
    taken out of line), optionally with one VM's job record gone."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        plan = load_manifest(str(images / "batch.yaml"))
        store, jobs = BatchStore(client), JobStore(client)
        store.create(plan.batch, plan.to_dict(), max_parallel=1)
        for vm in plan.vms:
            jobs.create(job_id_for(plan.batch, vm.id), vm.disks[0].source, batch=plan.batch)
            store.drop_vm(plan.batch, vm.id)
        if drop_job:
            assert client.delete(keys.job_key(job_id_for(plan.batch, drop_job))) == 1
    finally:
        client.close()


# --------------------------------------------------------------------------- broker unreachable


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_a_closed_port_is_one_line_with_the_password_masked(command, images, private_work_dir):
    port = free_port()
    proc = cli(
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
        *command_lines(images)[command],
        work_dir=private_work_dir,
    )
    assert_one_line(
        proc,
        2,
        f"cannot reach the broker at redis://:***@127.0.0.1:{port}/0: Connection refused",
    )


@pytest.mark.parametrize("command", ("status", "submit", "inspect"))
def test_an_unknown_host_is_one_line(command, images, private_work_dir):
    proc = cli(
        f"redis://user:{SECRET}@no-such-host.invalid:6379/0",
        *command_lines(images)[command],
        work_dir=private_work_dir,
    )
    assert_one_line(proc, 2, "cannot reach the broker at redis://user:***@no-such-host.invalid")


@pytest.mark.parametrize("command", ("status", "report", "submit", "run"))
def test_a_wrong_or_missing_password_is_one_line(command, images, auth_redis, private_work_dir):
    wrong = cli(
        auth_redis.url(password=SECRET + "-wrong"),
        *command_lines(images)[command],
        work_dir=private_work_dir,
    )
    line = assert_one_line(
        wrong, 2, f"cannot log in to the broker at redis://:***@127.0.0.1:{auth_redis.port}/0"
    )
    assert SECRET + "-wrong" not in line and "invalid username-password pair" in line
    missing = cli(
        auth_redis.url(password=None), *command_lines(images)[command], work_dir=private_work_dir
    )
    assert_one_line(missing, 2, "it requires a password and the URL has none")


@pytest.mark.parametrize("command", ("status", "cancel", "submit", "inspect"))
def test_a_listener_that_is_not_redis_is_one_line(command, images, not_redis, private_work_dir):
    proc = cli(
        f"redis://:{SECRET}@127.0.0.1:{not_redis}/0",
        *command_lines(images)[command],
        work_dir=private_work_dir,
    )
    assert_one_line(proc, 2, f"the broker at redis://:***@127.0.0.1:{not_redis}/0")


@pytest.mark.parametrize("command", ("status", "submit", "run", "inspect"))
def test_invalid_settings_are_one_line(command, images, redis_url, private_work_dir):
    proc = cli(
        redis_url,
        *command_lines(images)[command],
        work_dir=private_work_dir,
        VMCRAFT_MAX_ATTACHED="many",
    )
    assert_one_line(proc, 2, "invalid fleet settings: VMCRAFT_MAX_ATTACHED must be a whole number")


# --------------------------------------------------------------------------- batch gone


@pytest.mark.parametrize("command", (*BATCH_COMMANDS, "status --json", "report --json"))
def test_a_batch_that_is_not_there_is_one_line(command, images, redis_url, private_work_dir):
    proc = cli(redis_url, *command_lines(images)[command], work_dir=private_work_dir)
    assert_one_line(proc, 2, "no batch 'nope' on this fleet")


@pytest.mark.parametrize("command", ("status", "report", "cancel", "resume"))
def test_a_batch_lost_with_its_redis_is_one_line(command, images, auth_redis, private_work_dir):
    """The batch existed; then Redis came back empty (a restart without its data)."""
    record_batch(auth_redis.url(), images)
    first = cli(auth_redis.url(), "status", "b1", work_dir=private_work_dir)
    assert first.returncode == 0 and "batch b1" in first.stdout, first.stderr
    auth_redis.client().flushall()
    proc = cli(auth_redis.url(), *command_lines(images, "b1")[command], work_dir=private_work_dir)
    assert_one_line(proc, 2, "no batch 'b1' on this fleet")


def test_watch_ends_in_one_line_when_the_batch_vanishes_under_it(
    images, auth_redis, private_work_dir
):
    record_batch(auth_redis.url(), images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCRAFT_")}
    env.update(VMCRAFT_BROKER_URL=auth_redis.url(), VMCRAFT_WORK_DIR=private_work_dir)
    watch = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "watch", "b1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline().startswith("batch b1 ")  # it is watching
        auth_redis.client().flushall()
        _, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)
    assert watch.returncode == 2
    assert "Traceback" not in err
    assert err.splitlines() == ["vmcraft-tasks: no batch 'b1' on this fleet"]


@pytest.mark.parametrize("command", ("status", "report", "watch", "status --json"))
def test_a_batch_missing_a_job_record_is_one_line(command, images, redis_url, private_work_dir):
    record_batch(redis_url, images, drop_job="web02")
    proc = cli(redis_url, *command_lines(images, "b1")[command], work_dir=private_work_dir)
    assert_one_line(proc, 2, "batch 'b1' is incomplete on this fleet: VM 'web02' has no job record")


def test_resume_runs_again_a_vm_whose_record_is_gone(images, redis_url, private_work_dir):
    """What the message above advises works: resume recreates the record (and, with no
    worker here, the VM waits in line)."""
    record_batch(redis_url, images, drop_job="web02")
    proc = cli(redis_url, "resume", "b1", work_dir=private_work_dir)
    assert proc.returncode == 0, proc.stderr
    assert "web02" in proc.stdout
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert JobStore(client).get(job_id_for("b1", "web02")).status == "queued"
    client.close()


# --------------------------------------------------------------------------- no host online


@pytest.mark.parametrize("command", ("submit", "run", "inspect"))
def test_no_host_online_names_the_broker_masked(command, images, auth_redis, private_work_dir):
    proc = cli(auth_redis.url(), *command_lines(images)[command], work_dir=private_work_dir)
    assert_one_line(
        proc, 1, f"no conversion host is online on redis://:***@127.0.0.1:{auth_redis.port}/0"
    )


# --------------------------------------------------------------------------- the Python API


def test_the_api_raises_batch_errors_not_key_errors(images, redis_url):
    client = fleet_client(redis_url)
    try:
        for call in (
            batch_api.batch_status,
            batch_api.batch_report,
            batch_api.cancel_batch,
            batch_api.resume_batch,
        ):
            with pytest.raises(BatchNotFoundError, match="no batch 'nope' on this fleet") as info:
                call(client, "nope")
            assert isinstance(info.value, BatchError) and not isinstance(info.value, KeyError)
            assert info.value.batch == "nope"
    finally:
        client.close()


def test_the_api_masks_the_broker_in_its_errors(auth_redis):
    client = fleet_client(auth_redis.url(password=SECRET + "x"))
    try:
        with pytest.raises(BrokerUnavailableError) as info:
            client.ping()
        assert SECRET not in str(info.value)
        assert str(info.value).startswith("cannot log in to the broker at redis://:***@")
        assert isinstance(info.value.__cause__, redis.AuthenticationError)
    finally:
        client.close()


# --------------------------------------------------------------------------- watch and outages


def _watch_in_thread(
    client: FleetClient, out: io.StringIO, **kwargs: float
) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["status"] = watch_batch(client, "b1", out=out, interval_s=0.05, **kwargs)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_watch_rides_out_a_redis_restart(images, auth_redis):
    """Redis restarted with its data, a few seconds down: watch says so once, goes on,
    and ends with the batch."""
    record_batch(auth_redis.url(), images)
    client = fleet_client(auth_redis.url())
    out = io.StringIO()
    try:
        thread, result = _watch_in_thread(client, out, outage_s=30.0)
        _wait_for(lambda: "batch b1" in out.getvalue())
        auth_redis.stop()
        _wait_for(lambda: "retrying" in out.getvalue())
        time.sleep(0.5)
        restarted = start_auth_redis(auth_redis.port, auth_redis.workdir)
        auth_redis.proc = restarted.proc  # the fixture stops the new one
        jobs = JobStore(auth_redis.client())
        for vm in ("web01", "web02"):
            jobs.fail(job_id_for("b1", vm), "failed for the test")
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert "error" not in result, result
        status = result["status"]
        assert isinstance(status, batch_api.BatchStatus) and status.finished
        notices = [line for line in out.getvalue().splitlines() if "retrying" in line]
        # Said once. Why depends on where the poll was when Redis went: refused (between
        # polls), or closed or reset by the server shutting down (in the middle of one).
        assert len(notices) == 1, notices
        prefix = f"cannot reach the broker at redis://:***@127.0.0.1:{auth_redis.port}/0: "
        assert notices[0].startswith(prefix) and notices[0].endswith("; retrying for up to 30 s")
        reason = notices[0][len(prefix) : -len("; retrying for up to 30 s")]
        assert reason.rstrip(".") in ("Connection refused", "Connection closed by server") or (
            "Connection reset by peer" in reason
        ), reason
        assert SECRET not in out.getvalue()
    finally:
        client.close()


def test_watch_gives_up_after_the_outage_limit(images, auth_redis):
    record_batch(auth_redis.url(), images)
    client = fleet_client(auth_redis.url())
    out = io.StringIO()
    try:
        thread, result = _watch_in_thread(client, out, outage_s=0.5)
        _wait_for(lambda: "batch b1" in out.getvalue())
        started = time.monotonic()
        auth_redis.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
        error = result.get("error")
        assert isinstance(error, BrokerUnavailableError), result
        assert time.monotonic() - started < 10
        assert SECRET not in str(error)
    finally:
        client.close()


def test_watch_of_an_unreachable_broker_fails_at_once(images):
    client = fleet_client(f"redis://:{SECRET}@127.0.0.1:{free_port()}/0")
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            watch_batch(client, "b1", out=io.StringIO(), outage_s=30.0)
        assert time.monotonic() - started < 5  # no outage to ride out: never connected
    finally:
        client.close()
