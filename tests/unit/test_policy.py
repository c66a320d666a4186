"""Worker-side policy on step messages (pure parts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest

from vmcraft_tasks import policy
from vmcraft_tasks.batches import BatchStore


def test_inspection_requests_are_read_only_and_inside_the_roots(tmp_path):
    image = tmp_path / "a.raw"
    image.write_bytes(b"x")
    req = policy.inspect_request({"job_id": "j", "image": str(image)}, [str(tmp_path)])
    assert req.image == str(image)
    with pytest.raises(policy.MessageRefused, match="read-only"):
        policy.inspect_request({"job_id": "j", "image": str(image), "readonly": False}, [])
    with pytest.raises(policy.MessageRefused, match="outside the allowed image roots"):
        policy.inspect_request({"job_id": "j", "image": str(image)}, ["/nonexistent"])


@pytest.mark.parametrize("job_id", [None, "", "a/b", "x" * 200, 7])
def test_a_message_must_name_a_valid_job(job_id):
    with pytest.raises(policy.MessageRefused, match="no valid job id"):
        policy.job_id_of({"job_id": job_id})


def _marker(job_id: str) -> Callable[[str], dict[str, str]]:
    return lambda _path: {"job_id": job_id}


def test_state_dirs_must_be_this_hosts_and_this_jobs(tmp_path):
    host = tmp_path / "h1"
    mine = host / "attach-abc"
    mine.mkdir(parents=True)
    message = {"job_id": "j1", "state_dir": str(mine)}
    assert policy.state_dir_of(message, str(host), _marker("j1")) == str(mine)
    with pytest.raises(policy.MessageRefused, match="does not belong to job j1"):
        policy.state_dir_of(message, str(host), _marker("j2"))
    elsewhere = tmp_path / "attach-x"
    elsewhere.mkdir()
    with pytest.raises(policy.MessageRefused, match="not an attach directory of this host"):
        policy.state_dir_of({"job_id": "j1", "state_dir": str(elsewhere)}, str(host), _marker("j1"))
    link = host / "attach-link"
    link.symlink_to(elsewhere)
    with pytest.raises(policy.MessageRefused, match="not an attach directory of this host"):
        policy.state_dir_of({"job_id": "j1", "state_dir": str(link)}, str(host), _marker("j1"))


class FakeStore:  # FAKE: the batch record as BatchStore would return it
    def __init__(self, plan: dict[str, Any]) -> None:
        self._plan = plan

    def exists(self, batch: str) -> bool:
        return bool(batch == self._plan["batch"])

    def plan(self, batch: str) -> dict[str, Any]:
        return self._plan


def test_the_plan_comes_from_the_batch_record_and_is_checked_against_the_roots(tmp_path):
    vm = {"id": "vm1", "disks": [{"source": "/data/in/a.vmdk", "target": "/out/b/vm1-disk0.qcow2"}]}
    # The fake has the two methods trusted_plan uses; it stands in for a BatchStore.
    store = cast(BatchStore, FakeStore({"batch": "b", "vms": [vm]}))
    message = {"job_id": "b.vm1", "batch": "b", "vm_id": "vm1", "plan": {"id": "forged"}}
    got = policy.trusted_plan(store, message, image_roots=["/data"], output_roots=["/out"])
    assert got == vm
    with pytest.raises(policy.MessageRefused, match="outside this host's image roots"):
        policy.trusted_plan(store, message, image_roots=["/elsewhere"], output_roots=[])
    with pytest.raises(policy.MessageRefused, match="outside this host's output roots"):
        policy.trusted_plan(store, message, image_roots=[], output_roots=["/srv"])
    with pytest.raises(policy.MessageRefused, match="is not VM vm1 of batch b"):
        policy.trusted_plan(store, {**message, "job_id": "b.vm2"}, image_roots=[], output_roots=[])
    with pytest.raises(policy.MessageRefused, match="batch b has no VM 'vm9'"):
        policy.trusted_plan(
            store,
            {"job_id": "b.vm9", "batch": "b", "vm_id": "vm9"},
            image_roots=[],
            output_roots=[],
        )
