"""Reading a manifest for a run: structural problems refuse the batch, a broken disk
fails only its own VM (with the reason), so one bad image does not hold up hundreds."""

from __future__ import annotations

import re
from collections.abc import Sequence

from scheduler.manifest import ManifestError, Problem, load_manifest
from vmcraft_tasks.models import BatchPlan

_DISK_FIELD = re.compile(r"^vms\[\d+\]\.disks(\[\d+\])?$")
# Problems that are about one image, not about the manifest: the VM fails, the batch runs.
_IMAGE_WORDS = (
    "no such file",
    "not readable",
    "unsupported",
    "not a readable disk image",
    "corrupt",
    "missing",
    "backing",
    "invalid",
)


def is_vm_image_problem(problem: Problem) -> bool:
    if problem.vm is None or not _DISK_FIELD.match(problem.field):
        return False
    text = problem.message.lower()
    if "image roots" in text:
        return False  # a policy breach: refuse the batch
    return any(word in text for word in _IMAGE_WORDS)


def load_for_run(
    path: str,
    *,
    image_roots: Sequence[str] = (),
    output_roots: Sequence[str] = (),
    strict: bool = False,
) -> tuple[BatchPlan, dict[str, str]]:
    """The plan and, per VM whose disks cannot be used, the reason it will fail."""
    try:
        return load_manifest(path, image_roots=image_roots, output_roots=output_roots), {}
    except ManifestError as exc:
        if strict or not all(is_vm_image_problem(p) for p in exc.problems):
            raise
        failed: dict[str, str] = {}
        for problem in exc.problems:
            assert problem.vm is not None
            failed.setdefault(problem.vm, str(problem))
        plan = load_manifest(
            path, image_roots=image_roots, output_roots=output_roots, check_files=False
        )
        return plan, failed
