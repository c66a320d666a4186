"""Faults a fleet meets in production, injected into a real one: three workers, a real
redis-server, batches of real sample images.

Every scenario asserts the same four things: the batch ends within a bounded time
after the fault (seconds here: heartbeats of 1 s and leases of 5 s; minutes with
production settings), nothing of the fleet is left behind (no attach, mount, loop
device, helper process, `.part` file, slot lease or semaphore place), the sources
are byte-identical, and every VM that failed says why. Run with `-s` to see the
measured figures (`CHAOS <scenario>: {...}` lines).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import HOSTS, Chaos, checksums
from vmcraft_tasks import keys
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from worker import procs
from worker.registry import list_hosts
from worker.semaphore import RedisSemaphore

pytestmark = pytest.mark.chaos

# How long a batch may take to end after a fault, with the fleet's test settings
# (heartbeat 1 s, lease 5 s): the reconciler's grace period is 5 s.
BOUND_S = 90.0


def _vms(sources: list[str], **options: object) -> list[dict[str, object]]:
    return [
        {"id": f"vm{i:02d}", "disks": [path], "options": {"os": "none", **options}}
        for i, path in enumerate(sources)
    ]


def _parts_of(out: Path) -> list[str]:
    return sorted(str(p) for p in out.glob("*.part-*"))


def test_kill_9_during_conversions_kills_orphans_frees_slots_and_the_vms_continue(
    chaos, data_source, tmp_path
):
    c: Chaos = chaos(convert_rate="2M")
    sources = [data_source(f"slow{i}", 24) for i in range(6)]
    sums = checksums(sources)
    batch = c.submit(tmp_path, "convkill", _vms(sources))
    out = tmp_path / "convkill"
    conversions = RedisSemaphore(c.state, keys.semaphore_key("h1", "conversions"), 2, 5)

    def two_on_h1() -> list[str]:
        # Both of h1's conversions must have their qemu-img running (not just the
        # step started: it checks the source again before it copies).
        mine = c.jobs_where(batch, host="h1", status="converting")
        parts = [
            p for p in _parts_of(out) if _job_of(batch, p) in mine and procs.find("qemu-img", p)
        ]
        return parts if len(conversions.holders()) == 2 and len(parts) == 2 else []

    c.wait_for("two conversions on h1", two_on_h1, 60)
    h1_jobs = c.jobs_where(batch, host="h1", status="converting")
    orphans = {p: procs.find("qemu-img", p) for p in _parts_of(out)}
    c.kill9("h1")
    fault = time.monotonic()
    h1_parts = [p for p in orphans if _job_of(batch, p) in h1_jobs]
    assert len(h1_parts) == 2, orphans
    # qemu-img runs in its own session: it outlived the worker.
    assert all(procs.find("qemu-img", p) for p in h1_parts), h1_parts
    c.restart_host("h1")
    restarted = time.monotonic()

    def orphans_gone() -> bool:
        return all(not procs.find("qemu-img", p) and not os.path.exists(p) for p in h1_parts)

    c.wait_for("the dead worker's qemu-img and .part files gone", orphans_gone, 30)
    c.figures["orphans_cleaned_after_restart_s"] = round(time.monotonic() - restarted, 2)
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_after_kill_s"] = round(time.monotonic() - fault, 2)
    c.assert_every_failure_has_a_reason(status)
    states = {vm.vm_id: vm.status for vm in status.vms}
    # The killed conversions were redelivered to the restarted host and finished there.
    assert set(states.values()) == {"done"}, status.to_dict()
    for job in h1_jobs:
        steps = [s for s in c.client.jobs.steps(job) if s["task"] == "vmcraft.vm.convert"]
        assert steps and steps[-1]["outcome"] == "replaced" and steps[-1]["host"] == "h1", steps
    c.assert_nothing_left(out)
    assert checksums(sources) == sums
    c.report("kill -9 during two conversions")


def test_kill_9_during_mounts_fails_the_attached_vms_and_the_batch_ends(
    chaos, mbr_logical_raw, linux_gpt_raw, tmp_path
):
    c: Chaos = chaos(vmcraft_max_mounts="1")
    sources = [mbr_logical_raw.path, linux_gpt_raw.path] * 4
    sums = checksums(sorted(set(sources)))
    # Hold h1's only mount place: its VMs stop after attaching, in the middle of mounting.
    blocker = RedisSemaphore(c.state, keys.semaphore_key("h1", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    try:
        batch = c.submit(tmp_path, "mountkill", _vms(sources))
        c.wait_for(
            "a VM of h1 mounting",
            lambda: c.jobs_where(batch, host="h1", status="mounting"),
            60,
        )
        attached = c.jobs_where(batch, host="h1", status="mounting")
        c.kill9("h1")
        fault = time.monotonic()
    finally:
        blocker.release("test-blocker")
    c.restart_host("h1")
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_after_kill_s"] = round(time.monotonic() - fault, 2)
    c.assert_every_failure_has_a_reason(status)
    for vm in status.vms:
        if f"{batch}.{vm.vm_id}" in attached:
            assert vm.status == "failed" and vm.error is not None
            assert "died while the VM was in flight" in vm.error
    assert [vm for vm in status.vms if vm.status == "done"], status.to_dict()
    c.figures["failed"] = sorted(vm.vm_id for vm in status.vms if vm.status == "failed")
    c.assert_nothing_left(tmp_path / "mountkill")
    assert checksums(sorted(set(sources))) == sums
    c.report("kill -9 during mounts")


def test_kill_9_of_a_host_that_stays_down_the_watchdog_ends_or_requeues_its_vms(
    chaos, data_source, mbr_logical_raw, tmp_path
):
    c: Chaos = chaos(convert_rate="2M", vmcraft_max_mounts="1")
    # h1's only mount place is taken: VMs it attached wait there, mid-mount.
    blocker = RedisSemaphore(c.state, keys.semaphore_key("h1", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    sources = [*(data_source(f"gone{i}", 16) for i in range(3)), *[mbr_logical_raw.path] * 5]
    sums = checksums(sorted(set(sources)))
    batch = c.submit(tmp_path, "hostgone", _vms(sources))
    c.wait_for(
        "a VM of h1 attached and mid-mount",
        lambda: c.jobs_where(batch, host="h1", status="mounting"),
        60,
    )
    attached = c.jobs_where(batch, host="h1", status="mounting")
    converting = c.jobs_where(batch, host="h1", status="converting")
    c.kill9("h1")
    blocker.release("test-blocker")
    fault = time.monotonic()
    # h1 stays down: the other hosts' watchdog ends what h1 held.
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_after_kill_s"] = round(time.monotonic() - fault, 2)
    c.figures["attached_on_h1"] = len(attached)
    c.figures["converting_on_h1"] = len(converting)
    c.assert_every_failure_has_a_reason(status)
    states = {f"{batch}.{vm.vm_id}": vm for vm in status.vms}
    for job in attached:
        error = states[job].error
        assert states[job].status == "failed" and error is not None
        assert "host h1 went offline" in error
    for job in converting:
        # It held no disk: it was converted again on another host.
        assert states[job].status == "done" and states[job].host in ("h2", "h3"), states[job]
    # h1 comes back and releases what its dead worker left (disks, its qemu-img).
    c.restart_host("h1")
    c.assert_nothing_left(tmp_path / "hostgone")
    assert checksums(sorted(set(sources))) == sums
    c.report("kill -9 of a host that stays down")


def test_redis_restart_with_aof_every_vm_continues_or_fails_with_a_reason(
    chaos, data_source, mbr_logical_raw, linux_gpt_raw, dirty_ext4_raw, tmp_path
):
    c: Chaos = chaos(appendonly=True, convert_rate="4M", vmcraft_max_mounts="1")
    slow = [data_source(f"aof{i}", 24) for i in range(3)]
    sources = [*slow, *[mbr_logical_raw.path, linux_gpt_raw.path, dirty_ext4_raw.path] * 2]
    sums = checksums(sorted(set(sources)))
    # h2's only mount place is taken: its VMs sit attached in `mounting` through the
    # restart, with their leases held (the case that hung before).
    blocker = RedisSemaphore(c.state, keys.semaphore_key("h2", "mounts"), 1, 300)
    assert blocker.try_acquire("test-blocker")
    batch = c.submit(tmp_path, "aof", _vms(sources))

    def mid_flight() -> bool:
        return bool(
            c.jobs_where(batch, host="h2", status="mounting")
            and c.jobs_where(batch, status="converting")
        )

    c.wait_for("VMs in flight", mid_flight, 60)
    before = c.status(batch)
    assert before is not None
    c.figures["in_flight_at_fault"] = before.counts
    _down, first_back = c.redis.restart(down_s=4.5, keep_data=True)
    time.sleep(1.0)
    blocker.release("test-blocker")  # persisted through the restart, like everything else
    # And once more while the fleet is still recovering.
    time.sleep(2.0)
    _down, back = c.redis.restart(down_s=2.0, keep_data=True)
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_after_first_restart_s"] = round(time.monotonic() - first_back, 2)
    c.figures["batch_ended_after_second_restart_s"] = round(time.monotonic() - back, 2)
    c.figures["final"] = status.counts
    c.assert_every_failure_has_a_reason(status)
    c.assert_nothing_left(tmp_path / "aof")
    assert checksums(sorted(set(sources))) == sums
    for host, worker in c.fleet.hosts.items():
        assert worker.proc.poll() is None, f"worker {host} died:\n{worker.log_text()[-3000:]}"
    assert "AttributeError" not in c.log_text()
    c.report("Redis restart with AOF, 4.5 s down (and 2 s)")


def test_redis_restart_empty_hosts_reregister_and_release_the_lost_vms(
    chaos, mbr_logical_raw, linux_gpt_raw, tmp_path
):
    c: Chaos = chaos(appendonly=False, vmcraft_max_mounts="1")
    # Every host's only mount place is held: VMs stop attached, mid-mount.
    blockers = [RedisSemaphore(c.state, keys.semaphore_key(h, "mounts"), 1, 300) for h in HOSTS]
    for blocker in blockers:
        assert blocker.try_acquire("test-blocker")
    sources = [mbr_logical_raw.path, linux_gpt_raw.path] * 3
    batch = c.submit(tmp_path, "empty", _vms(sources))

    def attached() -> int:
        dirs = [d for h in HOSTS for d in attach_state_dirs(str(c.fleet.work_root / h))]
        mounting = c.jobs_where(batch, status="mounting")
        return len(dirs) if len(mounting) >= 3 else 0

    held = c.wait_for("VMs attached on the hosts", attached, 60)
    c.figures["attached_at_fault"] = held
    _down, back = c.redis.restart(down_s=2.0, keep_data=False)

    def recovered() -> bool:
        online = {h.host_id for h in list_hosts(c.state) if h.online}
        dirs = [d for h in HOSTS for d in attach_state_dirs(str(c.fleet.work_root / h))]
        return online == set(HOSTS) and not dirs

    c.wait_for("hosts back online and the lost VMs released", recovered, BOUND_S)
    c.figures["released_after_redis_back_s"] = round(time.monotonic() - back, 2)
    c.assert_nothing_left(tmp_path / "empty")
    assert "is gone from Redis" in c.log_text()
    # The fleet works again: a new batch runs to the end.
    again = c.submit(tmp_path, "after", _vms([mbr_logical_raw.path, linux_gpt_raw.path]))
    status = c.wait_finished(again, BOUND_S)
    assert {vm.status for vm in status.vms} == {"done"}, status.to_dict()
    c.report("Redis restart empty")


def test_sigterm_during_conversion_stops_it_and_the_vm_is_converted_elsewhere(
    chaos, data_source, tmp_path
):
    c: Chaos = chaos(convert_rate="1M")
    sources = [data_source(f"term{i}", 12) for i in range(6)]
    sums = checksums(sources)
    batch = c.submit(tmp_path, "term", _vms(sources))
    out = tmp_path / "term"

    def converting_on_h1() -> list[str]:
        mine = set(c.jobs_where(batch, host="h1", status="converting"))
        return [
            p for p in _parts_of(out) if _job_of(batch, p) in mine and procs.find("qemu-img", p)
        ]

    c.wait_for("a conversion on h1", converting_on_h1, 60)
    time.sleep(0.5)
    on_h1 = c.jobs_where(batch, host="h1", status="converting")
    parts = _parts_of(out)
    worker = c.fleet.hosts["h1"]
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(timeout=60)
    c.figures["worker_exited_after_sigterm_s"] = round(time.monotonic() - started, 2)
    c.fleet.hosts.pop("h1")
    assert c.figures["worker_exited_after_sigterm_s"] < 20
    # h1's conversions were stopped and their temporary files removed.
    stopped_parts = [p for p in parts if _job_of(batch, p) in on_h1]
    assert stopped_parts
    for part in stopped_parts:
        assert not procs.find("qemu-img", part) and not os.path.exists(part), part
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_after_sigterm_s"] = round(time.monotonic() - started, 2)
    c.assert_every_failure_has_a_reason(status)
    assert {vm.status for vm in status.vms} == {"done"}, status.to_dict()
    for job in on_h1:
        record = c.client.jobs.get(job)
        assert record.host in ("h2", "h3"), record
        steps = c.client.jobs.steps(job)
        stopped = [s for s in steps if s["task"] == "vmcraft.vm.convert" and s["host"] == "h1"]
        assert stopped and stopped[0]["outcome"] == "stopped", steps
    c.assert_nothing_left(out)
    assert checksums(sources) == sums
    c.report("SIGTERM during conversion")


def _job_of(batch: str, part: str) -> str:
    vm = os.path.basename(part).lstrip(".").split("-disk", 1)[0]
    return f"{batch}.{vm}"


@pytest.fixture
def full_folder(tmp_path):
    """A 16 MiB tmpfs inside the manifest's folder: a disk that fills up."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    import subprocess

    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(folder)], check=True
    )
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_in_the_output_folder_fails_those_vms_with_the_reason(
    chaos, data_source, mbr_logical_raw, full_folder, tmp_path
):
    c: Chaos = chaos()
    big = [data_source(f"big{i}", 32) for i in range(2)]
    sums = checksums([*big, mbr_logical_raw.path])
    vms = _vms(big)
    for vm in vms:
        vm["output_dir"] = str(full_folder)
    vms += [
        {"id": f"ok{i}", "disks": [mbr_logical_raw.path], "options": {"os": "none"}}
        for i in range(4)
    ]
    started = time.monotonic()
    batch = c.submit(tmp_path, "full", vms)
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_s"] = round(time.monotonic() - started, 2)
    c.assert_every_failure_has_a_reason(status)
    states = {vm.vm_id: (vm.status, vm.error or "") for vm in status.vms}
    for vm_id in ("vm00", "vm01"):
        state, error = states[vm_id]
        assert state == "failed" and "No space left on device" in error, states
    assert {states[f"ok{i}"][0] for i in range(4)} == {"done"}, states
    c.figures["reason"] = states["vm00"][1][-160:]
    c.assert_nothing_left(full_folder, tmp_path / "full")
    temporary = [p for p in full_folder.iterdir() if p.name.endswith(".tmp") or ".part-" in p.name]
    assert not temporary, temporary
    assert checksums([*big, mbr_logical_raw.path]) == sums
    c.report("disk full in the output folder")


def test_a_source_truncated_during_conversion_fails_its_vm_with_the_reason(
    chaos, data_source, mbr_logical_raw, tmp_path
):
    c: Chaos = chaos(convert_rate="2M")
    victim = data_source("victim", 24)
    batch = c.submit(
        tmp_path,
        "trunc",
        [
            {"id": "victim", "disks": [victim], "options": {"os": "none"}},
            {"id": "bystander", "disks": [mbr_logical_raw.path], "options": {"os": "none"}},
        ],
    )
    c.wait_for(
        "the victim converting",
        lambda: [p for p in _parts_of(tmp_path / "trunc") if "victim" in p],
        60,
    )
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    status = c.wait_finished(batch, BOUND_S)
    c.assert_every_failure_has_a_reason(status)
    states = {vm.vm_id: (vm.status, vm.error or "") for vm in status.vms}
    assert states["bystander"][0] == "done", states
    state, error = states["victim"]
    assert state == "failed" and "source" in error, states
    c.figures["reason"] = error[-200:]
    c.assert_nothing_left(tmp_path / "trunc")
    c.report("source truncated during conversion")


def test_a_source_truncated_or_replaced_after_submit_fails_its_vm_with_the_reason(
    chaos, data_source, tmp_path
):
    c: Chaos = chaos()
    truncated, replaced, kept = (data_source(n, 2) for n in ("cut", "swap", "kept"))
    other = data_source("other", 5)  # another disk, of another size
    vms = [
        {"id": "cut", "disks": [truncated], "options": {"os": "none", "host": "h1"}},
        {"id": "swap", "disks": [replaced], "options": {"os": "none", "host": "h1"}},
        {"id": "kept", "disks": [kept], "options": {"os": "none", "host": "h1"}},
    ]
    # Both conversion places of h1 are held: the VMs wait after submit, unconverted.
    places = RedisSemaphore(c.state, keys.semaphore_key("h1", "conversions"), 2, 300)
    assert places.try_acquire("test-blocker-1") and places.try_acquire("test-blocker-2")
    try:
        batch = c.submit(tmp_path, "swap", vms)
        c.wait_for(
            "the VMs waiting to convert",
            lambda: len(c.jobs_where(batch, status="converting")) == 3,
            60,
        )
        with open(truncated, "r+b") as fh:
            fh.truncate(os.path.getsize(truncated) // 2)
        os.replace(other, replaced)
    finally:
        places.release("test-blocker-1")
        places.release("test-blocker-2")
    status = c.wait_finished(batch, BOUND_S)
    c.assert_every_failure_has_a_reason(status)
    states = {vm.vm_id: (vm.status, vm.error or "") for vm in status.vms}
    assert states["kept"][0] == "done", states
    assert states["cut"][0] == "failed" and "since the batch was submitted" in states["cut"][1]
    assert states["swap"][0] == "failed" and "since the batch was submitted" in states["swap"][1]
    c.figures["reasons"] = {vm: states[vm][1][-120:] for vm in ("cut", "swap")}
    c.assert_nothing_left(tmp_path / "swap")
    c.report("source truncated or replaced after submit")


def test_xfs_clones_mount_at_once_with_their_logs_replayed(chaos, dirty_xfs_raw, tmp_path):
    c: Chaos = chaos()
    sums = checksums([dirty_xfs_raw.path])
    # One template, four VMs, one host: their XFS filesystems share a UUID and are
    # mounted (writable, converted copies) at the same time.
    vms = [
        {"id": f"clone{i}", "disks": [dirty_xfs_raw.path], "options": {"os": "none", "host": "h1"}}
        for i in range(4)
    ]
    started = time.monotonic()
    batch = c.submit(tmp_path, "clones", vms)
    status = c.wait_finished(batch, BOUND_S)
    c.figures["batch_ended_s"] = round(time.monotonic() - started, 2)
    assert {vm.status for vm in status.vms} == {"done"}, status.to_dict()
    windows = []
    for vm in status.vms:
        record = c.client.jobs.get(f"{batch}.{vm.vm_id}")
        assert record.result is not None
        (mount,) = [m for m in record.result["mounts"].values() if m["fstype"] == "xfs"]
        assert mount["ok"] and mount["strategy"] == "normal", mount
        assert "nouuid" in mount["options"] and "rw" in mount["options"], mount
        assert not mount["stale_view"], mount
        windows.append((record.timestamps["mounting"], record.timestamps["done"]))
    overlap = max(sum(1 for s, e in windows if s <= t < e) for t, _ in windows)
    c.figures["clones_mounted_at_once"] = overlap
    assert overlap >= 2, windows
    c.assert_nothing_left(tmp_path / "clones")
    assert checksums([dirty_xfs_raw.path]) == sums
    c.report("XFS clones at once")


def test_a_resumed_vm_that_ends_done_carries_no_stale_error(chaos, mbr_logical_raw, tmp_path):
    import json
    import shutil

    from scheduler.batch import resume_batch

    c: Chaos = chaos()
    late = tmp_path / "late" / "disk.raw"
    batch = c.submit(
        tmp_path,
        "resumed",
        [{"id": "late", "disks": [str(late)], "options": {"os": "none"}}],
    )
    (vm,) = c.wait_finished(batch, BOUND_S).vms
    assert vm.status == "failed" and vm.error
    late.parent.mkdir()
    shutil.copy(mbr_logical_raw.path, late)
    resume_batch(c.client, batch)
    (vm,) = c.wait_finished(batch, BOUND_S).vms
    assert vm.status == "done" and vm.error is None, vm.to_dict()
    record = c.client.jobs.get(f"{batch}.late")
    assert record.error is None and "error" not in record.to_dict()["progress"]
    out = tmp_path / "resumed"
    # The VM that ends the batch writes the summary right after it is done.
    c.wait_for(
        "the summary of the resumed batch",
        lambda: "| late | done |" in (out / "summary.md").read_text(),
        10,
    )
    report = json.loads((out / "late.json").read_text())
    assert not report.get("error"), report
    summary = json.loads((out / "summary.json").read_text())
    assert all(not r.get("error") for r in summary.get("vms", [])), summary
    assert "no such file" not in (out / "summary.md").read_text()
