"""Who owns an attach: a marker file in its state directory, written by the step that
attached it. Later steps resume only attaches made for their own job, and the host's
reconciler spares the attaches of live workers."""

from __future__ import annotations

import json
import os

from vmcraft_tasks.craft.atomicfile import atomic_write

JOB_MARKER = "job.json"


def write_job_marker(state_dir: str, job_id: str, host: str, worker_pid: int) -> None:
    marker = {"job_id": job_id, "host": host, "worker_pid": worker_pid}
    atomic_write(os.path.join(state_dir, JOB_MARKER), json.dumps(marker), fsync=False)


def read_job_marker(state_dir: str) -> dict[str, object]:
    try:
        with open(os.path.join(state_dir, JOB_MARKER)) as fh:
            data: dict[str, object] = json.load(fh)
            return data
    except (FileNotFoundError, ValueError):
        return {}
