"""The worker decides: every step checks what its message asks against its own settings.

A task message is untrusted input: anyone who can publish to the broker can hand a
step any dict. So nothing that decides what may be read or written is taken from a
message as it is:

- the VM's plan (sources, output folder, fixes, dry run) is loaded from the batch's
  record in Redis (trusted, written by the scheduler) by batch and VM id, and its
  paths are checked against this worker's image roots and output roots;
- the image a migration attaches is derived from that plan (its converted copy), never
  taken from the message, and write mode follows from the plan alone;
- an inspection job is always read-only and its image must lie under the image roots;
- an attach's state directory must be one this host made for this very job.

Client-side checks stay (early, friendly errors); these are the ones that hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmcraft_tasks.batches import BatchStore, job_id_for
from vmcraft_tasks.jobmarker import read_job_marker
from vmcraft_tasks.validation import validate_image_path

_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,160}$")
ATTACH_PREFIX = "attach-"


class MessageRefused(ValueError):
    """A step's message asked for something this worker's policy does not allow."""


@dataclass(frozen=True)
class InspectRequest:
    job_id: str
    image: str


def job_id_of(message: Any) -> str:
    """The job id a message names, if it is one (otherwise nothing can be recorded)."""
    job_id = message.get("job_id") if isinstance(message, dict) else None
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise MessageRefused(f"message names no valid job id: {job_id!r}")
    return job_id


def inspect_request(message: Any, image_roots: Sequence[str]) -> InspectRequest:
    """An inspection job: an image under the roots, attached read-only, nothing else."""
    job_id = job_id_of(message)
    if message.get("readonly", True) is not True:
        raise MessageRefused(
            "an inspection attaches read-only: write mode is only for the worker's own "
            "converted copies"
        )
    try:
        image = validate_image_path(message.get("image"), image_roots)
    except ValueError as exc:
        raise MessageRefused(str(exc)) from exc
    return InspectRequest(job_id, image)


def _inside(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def trusted_plan(
    store: BatchStore,
    message: Any,
    *,
    image_roots: Sequence[str],
    output_roots: Sequence[str],
) -> dict[str, Any]:
    """The VM's plan as the scheduler recorded it, checked against this worker's roots.

    The message only names the VM (batch, vm_id, job_id); a `plan` it carries is
    ignored. Raises MessageRefused when the VM is unknown or its paths break policy.
    """
    job_id = job_id_of(message)
    batch, vm_id = message.get("batch"), message.get("vm_id")
    if not (isinstance(batch, str) and _ID.match(batch)):
        raise MessageRefused(f"message names no valid batch: {batch!r}")
    if not (isinstance(vm_id, str) and _ID.match(vm_id)):
        raise MessageRefused(f"message names no valid VM: {vm_id!r}")
    if job_id != job_id_for(batch, vm_id):
        raise MessageRefused(f"job {job_id} is not VM {vm_id} of batch {batch}")
    if not store.exists(batch):
        raise MessageRefused(f"no batch {batch!r} on this fleet")
    plan = store.plan(batch)
    vm = next((v for v in plan.get("vms", []) if v.get("id") == vm_id), None)
    if vm is None:
        raise MessageRefused(f"batch {batch} has no VM {vm_id!r}")
    for disk in vm["disks"]:
        if image_roots and not _inside(disk["source"], image_roots):
            raise MessageRefused(
                f"{disk['source']} is outside this host's image roots ({', '.join(image_roots)})"
            )
        target_dir = os.path.dirname(disk["target"])
        if output_roots and not _inside(target_dir, output_roots):
            raise MessageRefused(
                f"{disk['target']} is outside this host's output roots ({', '.join(output_roots)})"
            )
    return dict(vm)


def names_batch_vm(message: Any) -> bool:
    """True when the message names a well-formed batch VM whose job id matches."""
    if not isinstance(message, dict):
        return False
    batch, vm_id, job_id = message.get("batch"), message.get("vm_id"), message.get("job_id")
    return (
        isinstance(batch, str)
        and isinstance(vm_id, str)
        and bool(_ID.match(batch))
        and bool(_ID.match(vm_id))
        and job_id == job_id_for(batch, vm_id)
    )


def write_mode(vm: dict[str, Any]) -> bool:
    """Only a plan that applies fixes attaches (its own converted copy) writable."""
    return bool(vm.get("fixes", True)) and not bool(vm.get("dry_run", False))


def state_dir_of(message: Any, host_work_dir: str, read_owner: Any) -> str:
    """The attach state directory a later step resumes: this host's, made for this job.

    `read_owner(state_dir)` returns the job marker the attach step wrote there.
    """
    job_id = job_id_of(message)
    raw = message.get("state_dir")
    if not isinstance(raw, str) or not raw:
        raise MessageRefused("message names no attach state directory")
    real = os.path.realpath(raw)
    parent = os.path.realpath(host_work_dir)
    if os.path.dirname(real) != parent or not os.path.basename(real).startswith(ATTACH_PREFIX):
        raise MessageRefused(f"{raw} is not an attach directory of this host")
    owner = read_owner(real).get("job_id") if os.path.isdir(real) else None
    if owner != job_id:
        raise MessageRefused(f"{raw} does not belong to job {job_id}")
    return real


def plan_of(rt: Any, message: Any) -> dict[str, Any]:
    """`trusted_plan` with this host's runtime (Redis store, image and output roots)."""
    return trusted_plan(
        BatchStore(rt.state),
        message,
        image_roots=rt.settings.image_roots,
        output_roots=getattr(rt.settings, "output_roots", ()),
    )


def state_dir_for(rt: Any, message: Any) -> str:
    """`state_dir_of` with this host's work directory and attach markers."""
    return state_dir_of(message, rt.host_work_dir, read_job_marker)
