"""Release what a killed worker of this host left behind, and end its VMs with a reason."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from vmcraft_tasks.craft.nbd.helpers import process_alive
from vmcraft_tasks.craft.nbd.reap import attach_state_dirs, release_state_dir
from worker.runtime import HostRuntime

log = logging.getLogger(__name__)

JOB_MARKER = "job.json"


@dataclass
class ReconcileReport:
    released_attaches: list[str] = field(default_factory=list)
    released_leases: list[str] = field(default_factory=list)
    failed_jobs: list[str] = field(default_factory=list)


def write_job_marker(state_dir: str, job_id: str, host: str, worker_pid: int) -> None:
    """Who owns an attach: the reconciler spares attaches of live workers."""
    path = os.path.join(state_dir, JOB_MARKER)
    with open(path + ".tmp", "w") as fh:
        json.dump({"job_id": job_id, "host": host, "worker_pid": worker_pid}, fh)
    os.replace(path + ".tmp", path)


def read_job_marker(state_dir: str) -> dict[str, object]:
    try:
        with open(os.path.join(state_dir, JOB_MARKER)) as fh:
            data: dict[str, object] = json.load(fh)
            return data
    except (FileNotFoundError, ValueError):
        return {}


def owner_alive(worker_pid: object, me: int) -> bool:
    return isinstance(worker_pid, int) and worker_pid != me and process_alive(worker_pid)


def reconcile(rt: HostRuntime, *, reason: str) -> ReconcileReport:
    """Release every attach and lease of this host whose owning worker is gone."""
    report = ReconcileReport()
    me = rt.worker_pid
    live_jobs = set()
    for state_dir in attach_state_dirs(rt.host_work_dir):
        marker = read_job_marker(state_dir)
        job_id = str(marker.get("job_id") or "")
        if owner_alive(marker.get("worker_pid"), me):
            live_jobs.add(job_id)
            continue
        log.warning(
            "releasing %s left by worker %s (job %s)", state_dir, marker.get("worker_pid"), job_id
        )
        release_state_dir(state_dir)
        report.released_attaches.append(state_dir)
        if job_id:
            _end_job(rt, job_id, reason, report)
    for _slot, owner in rt.leases.held().items():
        if owner in live_jobs:
            continue
        try:
            record = rt.jobs.get(owner)
        except KeyError:
            record = None
        owner_pid = record.progress.get("worker_pid") if record else None
        if owner_alive(owner_pid, me):
            continue
        _end_job(rt, owner, reason, report)
    return report


def _end_job(rt: HostRuntime, job_id: str, reason: str, report: ReconcileReport) -> None:
    if rt.leases.release(job_id):
        report.released_leases.append(job_id)
    try:
        if rt.jobs.fail(job_id, reason, host=rt.host_id):
            report.failed_jobs.append(job_id)
    except KeyError:
        pass
