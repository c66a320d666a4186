"""The worker decides: hand-crafted Celery messages cannot widen what a host reads or writes.

The workers here have image roots; the messages are built by hand (send_task with
whatever dict an attacker likes), not by the scheduler, and a "host file" outside
the roots stands in for /etc/shadow: a real disk image, so a step that wrongly
trusted the message would really attach and edit it.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import pytest

from scheduler.submit import FleetClient
from vmcraft_tasks.models.job import JobRecord
from vmcraft_tasks.samples.toolkit import sha256_file


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("policy")
    images, outside = base / "images", base / "host"
    images.mkdir()
    outside.mkdir()
    return images, outside


@pytest.fixture(scope="module")
def fleet(fleet_factory, roots):
    images, _outside = roots
    return fleet_factory(["h1"], concurrency=2, vmcraft_image_roots=str(images))


@pytest.fixture
def client(fleet):
    c = FleetClient(fleet.settings())
    yield c
    c.close()


@pytest.fixture
def host_file(roots, linux_gpt_raw):
    _images, outside = roots
    path = outside / "host-disk.raw"
    shutil.copyfile(linux_gpt_raw.path, path)
    yield str(path)
    path.unlink()


def _send(client: FleetClient, task: str, message: dict[str, Any], job_id: str) -> JobRecord:
    client.jobs.create(job_id, str(message.get("image", "-")))
    client.app.send_task(task, args=[message], queue="vmcraft.intake", task_id=f"{job_id}-x")
    return client.jobs.wait(job_id, timeout_s=30)


def test_an_inspection_outside_the_image_roots_is_refused(client, host_file):
    before = sha256_file(host_file)
    record = _send(client, "vmcraft.vm.attach", {"job_id": "j1", "image": host_file}, "j1")
    assert record.status == "failed"
    assert record.error is not None
    assert (
        "outside the allowed image roots" in record.error and "refused by host h1" in record.error
    )
    assert sha256_file(host_file) == before


def test_write_mode_cannot_be_asked_for_by_a_message(client, roots, linux_gpt_raw):
    images, _ = roots
    inside = images / "inside.raw"
    shutil.copyfile(linux_gpt_raw.path, inside)
    before = sha256_file(str(inside))
    message = {"job_id": "j2", "image": str(inside), "readonly": False}
    record = _send(client, "vmcraft.vm.attach", message, "j2")
    assert record.status == "failed" and record.error is not None
    assert "an inspection attaches read-only" in record.error
    assert sha256_file(str(inside)) == before


def test_a_plan_in_the_message_is_not_a_plan(client, host_file):
    """The `plan` key once skipped the roots check and made the attach writable."""
    before = sha256_file(host_file)
    forged = {
        "job_id": "evil.vm1",
        "batch": "evil",
        "vm_id": "vm1",
        "image": host_file,
        "readonly": False,
        "plan": {
            "id": "vm1",
            "disks": [{"source": host_file, "target": host_file}],
            "fixes": True,
            "dry_run": False,
        },
    }
    record = _send(client, "vmcraft.vm.attach", forged, "evil.vm1")
    assert record.status == "failed" and record.error is not None
    assert "no batch 'evil' on this fleet" in record.error
    start = {**forged, "job_id": "evil.vm2", "vm_id": "vm2"}
    record = _send(client, "vmcraft.vm.start", start, "evil.vm2")
    assert record.status == "failed" and record.error is not None
    assert "no batch 'evil' on this fleet" in record.error
    assert sha256_file(host_file) == before


def test_a_later_step_cannot_be_pointed_at_a_directory_it_did_not_make(client, tmp_path):
    planted = tmp_path / "attach-planted"
    planted.mkdir()
    (planted / "resources.json").write_text('{"qemu_nbd_pid": 1, "loop_devices": ["/dev/loop0"]}')
    message = {"job_id": "j4", "state_dir": str(planted), "host": "h1"}
    client.jobs.create("j4", "-")
    # A VM in flight on h1, as if its attach had run there: only the directory is forged.
    client.jobs.transition("j4", "attaching", host="h1")
    client.app.send_task("vmcraft.vm.scan", args=[message], queue="vmcraft.host.h1", task_id="j4-x")
    deadline = time.monotonic() + 20
    while not client.jobs.steps("j4"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (step,) = client.jobs.steps("j4")
    assert step["outcome"] == "failed"
    assert os.path.exists(planted / "resources.json")  # nothing of it was acted on
