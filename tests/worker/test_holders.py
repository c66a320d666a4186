"""Places tied to live holders, leases mirrored on the host, job records that Redis lost:
against a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from vmcraft_tasks import keys
from vmcraft_tasks.jobs import JobStore
from worker import procs
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore, WaitStopped
from worker.steps import COMPLETED, Holder, StepLedger, StepRecord, holding, step_key

HOST = "conv-01"
KEY = keys.semaphore_key(HOST, "conversions")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def _me(task_id: str = "t1") -> Holder:
    return Holder(HOST, os.getpid(), procs.start_ticks(os.getpid()), task_id, "job-1", "convert")


def _dead_holder() -> Holder:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = procs.start_ticks(proc.pid)
    proc.wait()
    return Holder(HOST, proc.pid, ticks, "t-dead", "job-2", "convert")


# -- process identity ---------------------------------------------------------------


def test_a_holder_is_alive_only_while_its_process_is_the_same():
    me = _me()
    assert me.process_alive()
    assert not _dead_holder().process_alive()
    # Same pid, another start time: a reused pid is not the holder.
    assert not Holder(HOST, me.pid, (me.pid_start or 0) + 1, "t1").process_alive()


def test_holder_round_trips_and_names_its_step():
    me = _me()
    assert Holder.from_json(me.to_json()) == me
    assert me.key == ("convert", "t1", os.getpid())
    assert Holder.from_json("not json") is None


# -- semaphore places with holders ------------------------------------------------------


def test_a_place_records_its_holder_and_only_that_holder_is_evicted(client):
    sem = RedisSemaphore(client, KEY, limit=2, ttl_s=5)
    me, dead = _me(), _dead_holder()
    assert sem.try_acquire("job-1:0", me)
    assert sem.try_acquire("job-2:0", dead)
    assert sem.holders_detail() == {"job-1:0": me, "job-2:0": dead}
    # A newer run of the same step re-took the token: evicting the old holder is a no-op.
    assert not sem.evict("job-1:0", dead)
    assert sem.evict("job-2:0", dead)
    assert sem.holders() == ["job-1:0"]
    assert client.hkeys(sem.holders_key) == ["job-1:0"]
    assert sem.release("job-1:0")
    assert client.exists(sem.holders_key) == 0


def test_a_place_taken_inside_a_step_names_that_step(client):
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    with holding(_me("step-9")):
        assert sem.try_acquire("tok")
    assert sem.holders_detail()["tok"] == _me("step-9")
    assert sem.try_acquire("other-host-test") is False  # full
    sem.release("tok")
    assert sem.try_acquire("bare")
    assert sem.holders_detail() == {"bare": None}  # taken outside any step


def test_expired_places_take_their_holder_records_along(client):
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=0.2)
    assert sem.try_acquire("old", _me())
    time.sleep(0.3)
    assert sem.try_acquire("new", _me("t2"))
    assert client.hkeys(sem.holders_key) == ["new"]


def test_a_waiter_stops_waiting_when_asked(client):
    sem = RedisSemaphore(client, KEY, limit=1, ttl_s=5)
    assert sem.try_acquire("holder")
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(WaitStopped, match="host is shutting down"):
        sem.acquire(
            "waiter",
            timeout_s=30,
            poll_s=0.05,
            should_stop=lambda: "host is shutting down" if stop.is_set() else None,
        )
    assert time.monotonic() - started < 2
    assert sem.holders() == ["holder"]


# -- lease mirror ---------------------------------------------------------------------


def test_leases_are_mirrored_on_the_host_while_held(client, tmp_path: Path):
    leases = SlotLeases(client, HOST, slots=2, ttl_s=5, work_dir=str(tmp_path))
    assert leases.acquire("vm-a") and leases.acquire("vm-b")
    assert sorted(leases.local_owners()) == ["vm-a", "vm-b"]
    # Redis forgets (an empty restart): the host still knows what it holds.
    client.flushall()
    assert leases.held() == {}
    assert sorted(leases.local_owners()) == ["vm-a", "vm-b"]
    leases.release("vm-a")  # released whether or not Redis still had it
    assert leases.local_owners() == ["vm-b"]


# -- job records Redis lost -----------------------------------------------------------------


def test_writes_never_bring_back_a_record_redis_lost(client):
    jobs = JobStore(client)
    assert not jobs.transition("gone", "scanning")
    assert not jobs.fail("gone", "a reason")
    assert not jobs.set_progress("gone", mounted=1)
    assert jobs.bump_progress("gone", "mounted") == 0
    assert client.exists(keys.job_key("gone")) == 0
    assert jobs.status_and_host("gone") == (None, None)


def test_a_fresh_attempt_starts_from_a_fresh_record_and_done_carries_no_error(client):
    jobs = JobStore(client)
    jobs.create("j", "/img", batch="b")
    jobs.transition("j", "converting", host="h1")
    jobs.set_progress("j", convert_pct=40.0)
    jobs.fail("j", "the source was missing")
    jobs.create("j", "/img", batch="b")  # resume
    record = jobs.get("j")
    assert record.status == "queued" and record.error is None and record.progress == {}
    assert record.host is None and "failed" not in record.timestamps
    # Even when a stale error is in the record, `done` drops it.
    client.hset(keys.job_key("j"), "error", "stale")
    assert jobs.transition("j", "done", result={"ok": True})
    assert jobs.get("j").error is None


def test_statuses_in_one_round_trip(client):
    jobs = JobStore(client)
    jobs.create("a", "-")
    jobs.transition("a", "mounting", host="h2")
    assert jobs.statuses(["a", "missing"]) == {"a": ("mounting", "h2"), "missing": (None, None)}


# -- step ledger -------------------------------------------------------------------


def _record(task_id: str = "tid", task: str = "vmcraft.vm.scan", pid: int | None = None):
    pid = os.getpid() if pid is None else pid
    return StepRecord(
        task_id=task_id,
        retries=0,
        task=task,
        job_id="job-1",
        host=HOST,
        pid=pid,
        pid_start=procs.start_ticks(pid),
        worker_pid=os.getpid(),
        started=time.time(),
        deadline=time.time() + 60,
    )


def test_the_ledger_tells_running_from_done_and_keys_by_step(tmp_path: Path):
    ledger = StepLedger(str(tmp_path))
    scan = _record()
    ledger.begin(scan)
    assert ledger.running() == [scan]
    assert ledger.completed("vmcraft.vm.scan", "tid", 0) is None
    ledger.end(scan, "replaced")
    assert ledger.running() == []
    done = ledger.completed("vmcraft.vm.scan", "tid", 0)
    assert done is not None and done.outcome == "replaced"
    # `replace()` hands the task id to the next step: another step, another record.
    assert ledger.completed("vmcraft.vm.mount_partition", "tid", 0) is None
    assert ledger.completed("vmcraft.vm.scan", "tid", 1) is None
    assert step_key("vmcraft.vm.scan", "a/b", 2) == "scan~a_b~2"


def test_a_step_whose_process_died_is_marked_died_not_completed(tmp_path: Path):
    ledger = StepLedger(str(tmp_path))
    dead = _dead_holder()
    record = _record(pid=dead.pid)
    ledger.begin(record)
    (running,) = ledger.running()
    assert not running.holder.process_alive()
    ledger.mark_died(running)
    assert ledger.running() == []
    assert ledger.completed(record.task, record.task_id, 0) is None
    previous = ledger.previous(record.task, record.task_id, 0)
    assert previous is not None and previous.outcome == "died"
    assert "died" not in COMPLETED


def test_prune_forgets_old_finished_steps(tmp_path: Path):
    ledger = StepLedger(str(tmp_path))
    record = _record()
    ledger.begin(record)
    ledger.end(record, "done")
    assert ledger.prune(3600) == 0
    old = time.time() - 7200
    for name in os.listdir(ledger.done_dir):
        os.utime(os.path.join(ledger.done_dir, name), (old, old))
    assert ledger.prune(3600) == 1
