"""The host reconciler against a real Redis and real Celery messages: dead holders,
orphaned messages, lost VMs, records Redis lost, orphaned qemu-img; plus the guarded
kombu transport and the conversion guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from vmcraft_tasks import keys
from vmcraft_tasks.celery_app import celery_config, create_app
from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.jobs import JobStore
from worker import conversions, procs
from worker.broker import UNACKED, UNACKED_INDEX, Broker, job_id_of
from worker.reconcile import BEAT, START, STOP, Reconciler
from worker.runtime import HostRuntime
from worker.steps import Holder, StepRecord

HOST = "t1"


@pytest.fixture
def rt(redis_url: str, tmp_path: Path) -> Iterator[HostRuntime]:
    settings = FleetSettings(
        broker_url=redis_url,
        result_backend=redis_url,
        cache_url=redis_url,
        host_id=HOST,
        work_dir=str(tmp_path / "work"),
        heartbeat_s=1,
        lease_ttl_s=2,
    )
    runtime = HostRuntime(settings)
    os.environ["VMCRAFT_WORKER_PID"] = str(os.getpid())
    yield runtime
    os.environ.pop("VMCRAFT_WORKER_PID", None)
    runtime.state.close()
    runtime.probe.close()


@pytest.fixture
def app(rt: HostRuntime) -> Iterator[Any]:
    celery = create_app(rt.settings)
    yield celery
    celery.close()


def _take(client: redis.Redis, queue: str, tag: str, delivered_at: float) -> None:
    """Move the message at the head of `queue` into kombu's unacked structures, as a
    worker taking it (BRPOP + QoS.append) would."""
    raw = client.rpop(queue)
    assert isinstance(raw, str)
    payload = json.loads(raw)
    exchange = payload["properties"]["delivery_info"].get("exchange", "")
    client.hset(UNACKED, tag, json.dumps([payload, exchange, queue]))
    client.zadd(UNACKED_INDEX, {tag: delivered_at})


def _send(app: Any, task: str, job_id: str, queue: str, task_id: str) -> None:
    app.send_task(task, args=[{"job_id": job_id, "host": HOST}], queue=queue, task_id=task_id)


# -- broker view ------------------------------------------------------------------------


def test_the_broker_view_finds_the_vm_of_each_message_and_restores_or_drops_atomically(app, rt):
    queue = f"vmcraft.host.{HOST}"
    _send(app, "vmcraft.vm.scan", "b.vm1", queue, "id-1")
    _send(app, "vmcraft.vm.mount_partition", "b.vm2", queue, "id-2")
    broker = Broker(rt.state)
    queued, complete = broker.queued([queue, "vmcraft.intake", "not-ours"])
    assert complete
    assert {(m.task, m.job_id, m.host) for m in queued} == {
        ("vmcraft.vm.scan", "b.vm1", HOST),
        ("vmcraft.vm.mount_partition", "b.vm2", HOST),
    }
    _take(rt.state, queue, "tag-a", time.time())
    _take(rt.state, queue, "tag-b", time.time())
    first, second = sorted(broker.unacked(), key=lambda m: m.task_id)
    assert first.task_id == "id-1" and first.job_id == "b.vm1" and first.tag == "tag-a"
    assert broker.restore(first)
    assert not broker.restore(first)  # compare-and-move: only once
    assert broker.drop(second)
    assert rt.state.hlen(UNACKED) == 0 and rt.state.zcard(UNACKED_INDEX) == 0
    (back,) = [json.loads(x) for x in rt.state.lrange(queue, 0, -1)]
    assert back["headers"]["id"] == "id-1" and back["headers"]["redelivered"] is True
    assert back["properties"]["delivery_info"]["redelivered"] is True


def test_job_id_of_takes_the_last_context():
    assert job_id_of([{"job_id": "report"}, {"job_id": "ctx"}]) == "ctx"
    assert job_id_of([[], 3]) is None


# -- the reconciler -----------------------------------------------------------------------


def _in_flight(rt: HostRuntime, job: str, status: str = "scanning") -> None:
    jobs = JobStore(rt.state)
    jobs.create(job, "/img")
    jobs.transition(job, status, host=HOST)
    assert rt.leases.acquire(job)


def test_a_dead_holders_place_is_evicted_and_a_live_ones_renewed(rt):
    me = os.getpid()
    live = StepRecord(
        "live-task",
        0,
        "vmcraft.vm.mount_partition",
        "j-live",
        HOST,
        me,
        procs.start_ticks(me),
        me,
        time.time(),
        time.time() + 60,
    )
    rt.ledger.begin(live)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = procs.start_ticks(proc.pid)
    proc.wait()
    dead = Holder(HOST, proc.pid, ticks, "dead-task", "j-dead", "vmcraft.vm.mount_partition")
    mounts = rt.semaphore("mounts", 4)
    assert mounts.try_acquire("j-live:1", live.holder)
    assert mounts.try_acquire("j-dead:1", dead)
    assert mounts.try_acquire("operator")  # no holder: left to its TTL
    report = Reconciler(rt).run(BEAT)
    assert report.evicted_places == [f"mounts j-dead:1 (pid {proc.pid})"]
    assert sorted(mounts.holders()) == ["j-live:1", "operator"]


def test_at_start_an_orphaned_step_is_redelivered_and_a_stale_one_dropped(app, rt):
    queue = f"vmcraft.host.{HOST}"
    _in_flight(rt, "b.alive")
    JobStore(rt.state).create("b.ended", "/img")
    JobStore(rt.state).fail("b.ended", "failed before")
    _send(app, "vmcraft.vm.scan", "b.alive", queue, "s-1")
    _send(app, "vmcraft.vm.scan", "b.ended", queue, "s-2")
    _take(rt.state, queue, "tag-1", time.time() - 3600)
    _take(rt.state, queue, "tag-2", time.time() - 3600)
    report = Reconciler(rt).run(START)
    assert [m.split(":")[0] for m in report.restored_messages] == [
        "vmcraft.vm.scan s-1 (VM b.alive)"
    ]
    assert [m.split(":")[0] for m in report.dropped_messages] == [
        "vmcraft.vm.scan s-2 (VM b.ended)"
    ]
    # The VM is alive (its message is queued again): its lease is kept.
    assert rt.leases.owner_of("b.alive") is not None
    assert JobStore(rt.state).get("b.alive").status == "scanning"


def test_a_step_that_already_ran_here_is_not_redelivered(app, rt):
    queue = f"vmcraft.host.{HOST}"
    _in_flight(rt, "b.vm")
    me = os.getpid()
    done = StepRecord(
        "s-9",
        0,
        "vmcraft.vm.scan",
        "b.vm",
        HOST,
        me,
        procs.start_ticks(me),
        me,
        time.time(),
        time.time() + 60,
    )
    rt.ledger.begin(done)
    rt.ledger.end(done, "replaced")
    _send(app, "vmcraft.vm.scan", "b.vm", queue, "s-9")
    _take(rt.state, queue, "tag-9", time.time() - 3600)
    report = Reconciler(rt).run(START)
    assert report.dropped_messages and "already ran to its end here" in report.dropped_messages[0]
    assert rt.state.llen(queue) == 0


def test_a_vm_with_no_step_and_no_message_is_failed_after_the_grace_period(rt):
    _in_flight(rt, "b.lost", "mounting")
    reconciler = Reconciler(rt)
    assert reconciler.run(BEAT).failed_jobs == []  # first sight: only a suspicion
    time.sleep(reconciler.grace_s + 0.1)
    report = reconciler.run(BEAT)
    assert report.failed_jobs == ["b.lost"]
    record = JobStore(rt.state).get("b.lost")
    assert record.status == "failed" and record.error is not None
    assert "no step of the VM is running or queued" in record.error
    assert rt.leases.held() == {} and rt.leases.local_owners() == []


def test_a_vm_whose_record_redis_lost_is_released_and_logged(rt, caplog):
    _in_flight(rt, "b.gone")
    rt.state.flushall()  # Redis came back empty
    report = Reconciler(rt).run(START)
    assert report.gone_jobs == ["b.gone"]
    assert rt.leases.local_owners() == []
    assert "the record of VM b.gone is gone from Redis" in caplog.text


def test_at_stop_a_vm_without_a_disk_is_handed_back_or_failed(rt):
    _in_flight(rt, "plain", "converting")
    report = Reconciler(rt).run(STOP, reason=f"host {HOST} shut down while the VM was in flight")
    # Not a batch VM: nothing to hand it back to; it fails with the reason.
    assert report.failed_jobs == ["plain"]
    error = JobStore(rt.state).get("plain").error
    assert error is not None and "shut down while the VM was in flight" in error


def test_a_lease_redis_lost_is_taken_back_while_the_vm_lives_here(app, rt):
    queue = f"vmcraft.host.{HOST}"
    _in_flight(rt, "b.vm")
    _send(app, "vmcraft.vm.scan", "b.vm", queue, "s-1")  # waiting in the host queue
    rt.state.delete(keys.slot_key(HOST, 0))  # lapsed while Redis was down
    Reconciler(rt).run(BEAT)
    assert rt.leases.owner_of("b.vm") is not None


# -- orphaned conversions --------------------------------------------------------------


def _fake_qemu_img(part: Path) -> subprocess.Popen[bytes]:
    """A process whose command line is `qemu-img <part>`, as a real conversion's would
    name its temporary file (here the "file" is a script that just waits)."""
    part.write_text("import time\ntime.sleep(120)\n")
    proc = subprocess.Popen(
        ["qemu-img", str(part)], executable=sys.executable, start_new_session=True
    )
    deadline = time.monotonic() + 5
    while not procs.find("qemu-img", str(part)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_a_dead_conversion_is_stopped_and_its_temporary_files_removed(rt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "vm1-disk0.qcow2"
    staged = out / ".vm1-disk0.qcow2.0123456789abcdef.tmp"
    part = Path(f"{staged}.part-deadbeef")
    orphan = _fake_qemu_img(part)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = procs.start_ticks(proc.pid)
    proc.wait()
    holder = Holder(HOST, proc.pid, ticks, "c-1", "b.vm1", "vmcraft.vm.convert")
    guard = conversions.ConversionGuard(rt.host_work_dir, "b.vm1:0", "b.vm1", str(target), holder)
    guard.__enter__()
    from vmcraft_tasks.craft import commands

    commands._announce(["qemu-img", "convert", "-f", "raw", "src", str(part)])
    guard._done.set()  # the worker died here: the guard never exits
    guard._remove_observer()  # type: ignore[misc]
    report = Reconciler(rt).run(START)
    assert orphan.wait(timeout=10) is not None
    assert not part.exists()
    assert report.cleaned_conversions and "killed qemu-img" in report.cleaned_conversions[0]
    assert conversions.records(rt.host_work_dir) == []


def test_the_guard_stops_a_conversion_when_the_host_shuts_down(rt, tmp_path):
    target = tmp_path / "vm2-disk0.qcow2"
    part = Path(f"{target}.part-0a0b")
    guard = conversions.ConversionGuard(
        rt.host_work_dir,
        "b.vm2:0",
        "b.vm2",
        str(target),
        Holder(HOST, os.getpid(), procs.start_ticks(os.getpid()), "c-2", "b.vm2", "convert"),
        checks=[lambda: conversions.stop_requested(rt.host_work_dir, rt.worker_pid)],
        interval_s=0.05,
    )
    with guard:
        from vmcraft_tasks.craft import commands

        commands._announce(["qemu-img", "convert", str(part)])
        running = _fake_qemu_img(part)
        conversions.request_stop(rt.host_work_dir, rt.worker_pid, "host t1 is shutting down")
        started = time.monotonic()
        assert running.wait(timeout=10) is not None
        assert time.monotonic() - started < 5
        assert guard.stopped == "host t1 is shutting down"
    conversions.clear_stop(rt.host_work_dir)
    part.unlink(missing_ok=True)


def test_temporary_names_of_a_conversion():
    target = "/o/vm1-disk0.qcow2"
    assert conversions.is_temporary_of("/o/vm1-disk0.qcow2.part-00ff", target)
    assert conversions.is_temporary_of("/o/.vm1-disk0.qcow2.0123456789abcdef.tmp", target)
    assert conversions.is_temporary_of("/o/.vm1-disk0.qcow2.0123456789abcdef.tmp.part-1", target)
    # The marker's own temporary file, another VM's disk, another folder: not ours.
    assert not conversions.is_temporary_of(
        "/o/.vm1-disk0.qcow2.vmcraft.json.0123456789abcdef.tmp", target
    )
    assert not conversions.is_temporary_of("/o/vm10-disk0.qcow2.part-00ff", target)
    assert not conversions.is_temporary_of("/x/vm1-disk0.qcow2.part-00ff", target)


# -- configuration and transport ------------------------------------------------------------


def test_the_celery_configuration_rides_out_broker_outages():
    conf = celery_config(FleetSettings())
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["broker_transport"] == "worker.transport:Transport"
    assert conf["task_publish_retry_policy"]["max_retries"] >= 10
    assert conf["result_backend_always_retry"] is True
    assert "visibility_timeout" not in conf["result_backend_transport_options"]
    other = celery_config(FleetSettings(broker_url="amqp://guest@host//"))
    assert "broker_transport" not in other


def test_restoring_unacked_messages_on_a_torn_down_channel_does_not_crash(redis_url):
    from worker.transport import Transport

    with Connection(redis_url, transport=Transport) as conn:
        channel = conn.channel()
        qos = channel.qos
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        client.hset(UNACKED, "tag-x", json.dumps([{"headers": {}}, "", "vmcraft.intake"]))
        qos._delivered["tag-x"] = object()
        # What a broker restart can leave: a channel whose connection is gone.
        channel._pool = None
        connection, channel.connection = channel.connection, None
        try:
            qos.restore_unacked()  # kombu's own raises AttributeError here
            with pytest.raises(redis.exceptions.ConnectionError):
                channel._connparams()
        finally:
            channel.connection = connection
        # Left for the reconciler, not lost.
        assert client.hexists(UNACKED, "tag-x")
        assert not qos._delivered
        client.close()


def test_only_requests_the_ledger_agrees_with_are_evidence_of_life(rt):
    me = os.getpid()
    ended = StepRecord(
        "r-1",
        0,
        "vmcraft.vm.scan",
        "b.vm",
        HOST,
        me,
        procs.start_ticks(me),
        me,
        time.time(),
        time.time() + 60,
    )
    rt.ledger.begin(ended)
    rt.ledger.end(ended, "replaced")
    held: list[tuple[str, str, int, str | None]] = [
        ("r-1", "vmcraft.vm.scan", 0, "b.vm"),  # ended: Celery kept a stale request
        ("r-2", "vmcraft.vm.mount_partition", 0, "b.other"),  # prefetched, not started
    ]
    reconciler = Reconciler(rt, held=lambda: held)
    mono = time.monotonic()
    assert reconciler._believable(held, [], mono) == {"r-2": "b.other"}
    # Not started a grace period later: not believed either.
    assert reconciler._believable(held, [], mono + reconciler.grace_s + 1) == {}


def test_the_guard_records_the_pid_of_the_qemu_img_it_watches(rt, tmp_path):
    target = tmp_path / "vm3-disk0.qcow2"
    part = Path(f"{target}.part-0c0d")
    holder = Holder(HOST, os.getpid(), procs.start_ticks(os.getpid()), "c-3", "b.vm3", "convert")
    guard = conversions.ConversionGuard(
        rt.host_work_dir, "b.vm3:0", "b.vm3", str(target), holder, interval_s=0.05
    )
    with guard:
        from vmcraft_tasks.craft import commands

        commands._announce(["qemu-img", "convert", str(part)])
        running = _fake_qemu_img(part)
        deadline = time.monotonic() + 20  # a bound on a hang, not a timing target
        while not guard.record.pids:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ((_path, record),) = conversions.records(rt.host_work_dir)
        assert record.pids == ((running.pid, procs.start_ticks(running.pid), str(part)),)
        running.kill()
        running.wait()
    part.unlink(missing_ok=True)
