"""Three simulated hosts, real workers, real Redis: pinning, limits, cache, cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

# kombu re-exports these lazily, so mypy cannot see them on the package itself.
from kombu import Connection, Exchange, Producer  # type: ignore[attr-defined]

from scheduler.submit import FleetClient
from vmcraft_tasks import keys
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs
from worker.leases import SlotLeases
from worker.semaphore import RedisSemaphore
from worker.timeline import intervals, max_overlap

HOSTS = ["h1", "h2", "h3"]
MAX_ATTACHED = 2
MAX_MOUNTS = 2


@pytest.fixture(scope="module")
def fleet(fleet_factory):
    return fleet_factory(
        HOSTS,
        concurrency=4,
        vmcraft_max_attached=str(MAX_ATTACHED),
        vmcraft_max_mounts=str(MAX_MOUNTS),
    )


@pytest.fixture
def client(fleet):
    c = FleetClient(fleet.settings())
    yield c
    c.close()


def assert_host_is_clean(fleet, host: str) -> None:
    assert attach_state_dirs(os.path.join(fleet.work_root, host)) == []
    state = fleet.state
    assert SlotLeases(state, host, MAX_ATTACHED, 5).held() == {}
    assert RedisSemaphore(state, keys.semaphore_key(host, "mounts"), MAX_MOUNTS, 60).holders() == []


def test_ten_vms_pinned_limited_and_clean(
    fleet, client, overlay, linux_gpt_raw, mbr_logical_raw, twenty_parts_raw
):
    bases = [linux_gpt_raw] * 4 + [mbr_logical_raw] * 3 + [twenty_parts_raw] * 3
    images = [(overlay(b.path), b) for b in bases]
    started = time.monotonic()
    jobs = {client.submit_inspect(path): built for path, built in images}
    records = {job: client.wait(job, timeout_s=180) for job in jobs}
    wall = time.monotonic() - started

    assert {r.status for r in records.values()} == {"done"}, {
        j: r.error for j, r in records.items()
    }
    used_hosts = set()
    for job, record in records.items():
        built = jobs[job]
        host = record.host
        used_hosts.add(host)
        assert record.result["host"] == host
        # A host that was full sent the VM back to the intake queue ("retry"); every
        # other step ran on the host that attached the disk.
        steps = [s for s in client.jobs.steps(job) if s["outcome"] != "retry"]
        assert {s["outcome"] for s in steps} <= {"done", "replaced"}
        names = [s["task"] for s in steps]
        assert names[0] == "vmcraft.vm.attach" and names[-1] == "vmcraft.vm.finalize"
        assert {s["host"] for s in steps} == {host}
        # The chord had one header task per mountable partition.
        mountable = [f for f in record.result["filesystems"] if f["type"] not in (None, "swap")]
        assert names.count("vmcraft.vm.mount_partition") == len(mountable)
        assert len(record.result["mounts"]) == len(mountable)
        if "hostname" in built.notes:
            assert [r["hostname"] for r in record.result["roots"]] == [built.notes["hostname"]]
        else:
            assert record.result["roots"] == []
    assert len(used_hosts) >= 2

    state = fleet.state
    peaks = {}
    for host in HOSTS:
        mounts = [(i.start, i.end) for i in intervals(state, host, "mount")]
        vms = [(i.start, i.end) for i in intervals(state, host, "vm")]
        peaks[host] = (len(vms), max_overlap(vms), len(mounts), max_overlap(mounts))
        assert max_overlap(mounts) <= MAX_MOUNTS
        assert max_overlap(vms) <= MAX_ATTACHED
        assert_host_is_clean(fleet, host)
    print(f"\n10 VMs in {wall:.2f} s; per host (VMs, peak attached, mounts, peak mounts): {peaks}")


def test_second_scan_of_an_image_is_a_cache_hit(fleet, client, overlay, linux_gpt_raw):
    image = overlay(linux_gpt_raw.path)
    first = client.wait(client.submit_inspect(image), timeout_s=60)
    second = client.wait(client.submit_inspect(image), timeout_s=60)
    assert first.status == second.status == "done"
    assert first.progress["scan_sfdisk"] == 1 and first.progress["scan_blkid"] == 1
    assert second.progress["scan_sfdisk"] == 0 and second.progress["scan_blkid"] == 0
    assert second.result["filesystems"] == first.result["filesystems"]


def test_failures_end_with_a_reason_and_release_everything(fleet, client, corrupt_vmdk, tmp_path):
    corrupt = client.wait(client.submit_inspect(corrupt_vmdk), timeout_s=60)
    assert corrupt.status == "failed"
    assert "not a readable disk image" in corrupt.error
    missing = client.wait(client.submit_inspect(str(tmp_path / "gone.vmdk")), timeout_s=60)
    assert missing.status == "failed" and "no such file" in missing.error
    for host in HOSTS:
        assert_host_is_clean(fleet, host)


def test_a_pickled_message_is_refused(fleet, client, linux_gpt_raw, tmp_path):
    """A pickle-serialised task message is rejected unexecuted; the fleet keeps working."""
    job_id = "pickled-job"
    client.jobs.create(job_id, linux_gpt_raw.path)
    env = fleet.env()
    with Connection(env["VMCRAFT_BROKER_URL"]) as conn:
        producer = Producer(conn)
        producer.publish(
            {"job_id": job_id},
            serializer="pickle",
            exchange=Exchange("vmcraft.intake", type="direct"),
            routing_key="vmcraft.intake",
            headers={
                "task": "vmcraft.vm.attach",
                "id": "pickled-task",
                "lang": "py",
                "argsrepr": "",
                "kwargsrepr": "",
            },
        )
    good = client.wait(client.submit_inspect(linux_gpt_raw.path), timeout_s=60)
    assert good.status == "done"
    time.sleep(0.5)
    assert client.jobs.get(job_id).status == "queued"
    assert client.jobs.steps(job_id) == []
    assert fleet.state.llen("vmcraft.intake") == 0


def _cli(fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=fleet.env(),
        check=False,
    )


def test_cli_inspects_through_the_fleet_and_names_the_host(fleet, overlay, linux_gpt_raw):
    proc = _cli(fleet, "inspect", "--json", overlay(linux_gpt_raw.path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["host"] in HOSTS
    assert data["roots"][0]["hostname"] == linux_gpt_raw.notes["hostname"]
    assert {m["strategy"] for m in data["mounts"].values()} == {"normal"}
    text = _cli(fleet, "inspect", overlay(linux_gpt_raw.path))
    assert text.returncode == 0, text.stderr
    assert "host      h" in text.stdout and "hostname  web01" in text.stdout


def test_cli_failure_is_one_line(fleet, corrupt_vmdk):
    proc = _cli(fleet, "inspect", corrupt_vmdk)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not a readable disk image" in proc.stderr
