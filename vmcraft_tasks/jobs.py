"""Per-VM job records in Redis: state, host, timestamps, reason for a failure, result.

A record is the truth a client waits on: a Celery result can stay pending forever
when the worker holding it dies, but the reconciler of the restarted host marks
the job failed with a reason. Terminal states are sticky: a late step of a failed
VM can never turn it back into "done".

Writes never bring a record back that Redis no longer has (a restart without
persistence): a step of such a VM must not recreate a half record that looks like a
VM in flight, so transitions and progress updates of a missing record do nothing,
and the host's reconciler releases what the VM held. A VM that ends `done` carries
no error: a resumed VM starts from a fresh record, and `done` clears the field.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from vmcraft_tasks import keys, luascripts
from vmcraft_tasks.models.job import (
    ATTACHING,
    BOOT_CHECKING,
    CANCELLED,
    CONVERTING,
    DETACHING,
    DONE,
    FAILED,
    FIXING,
    INSPECTING,
    MOUNTING,
    QUEUED,
    SCANNING,
    TERMINAL,
    JobRecord,
    parse_record,
)

# The states and the record live with the other models; they are used from here.
__all__ = [
    "ATTACHING",
    "BOOT_CHECKING",
    "CANCELLED",
    "CONVERTING",
    "DETACHING",
    "DONE",
    "FAILED",
    "FIXING",
    "INSPECTING",
    "MOUNTING",
    "QUEUED",
    "SCANNING",
    "TERMINAL",
    "JobRecord",
    "parse_record",
]

# The record's key is `keys.job_key(job_id)`, its step history `keys.job_steps_key`;
# both expire `JOB_TTL_S` after they were last written. The scripts: `lua/job_*.lua`.
JOB_TTL_S = keys.JOB_TTL_S


class JobNotFoundError(KeyError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class JobStore:
    """Job records; expects a client with `decode_responses=True`."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._transition = luascripts.register(client, "job_transition")
        self._update = luascripts.register(client, "job_update")
        self._bump = luascripts.register(client, "job_bump")

    def create(self, job_id: str, image: str, **fields: str) -> None:
        """A fresh record (replacing an older one: a resumed VM must not carry the
        error, result or progress of its last attempt). Step history stays."""
        now = time.time()
        mapping: dict[Any, Any] = {
            "status": QUEUED,
            "image": image,
            f"at:{QUEUED}": str(now),
            **fields,
        }
        key = keys.job_key(job_id)
        pipe = self.client.pipeline()  # MULTI (one key): nobody sees the record missing
        pipe.delete(key)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, JOB_TTL_S)
        pipe.execute()

    def transition(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move to `status` (recording when); False if the job had already ended."""
        args: list[str | int] = [JOB_TTL_S, "status", status, f"at:{status}", repr(time.time())]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else json.dumps(value)]
        return bool(self._transition(keys=[keys.job_key(job_id)], args=args))

    def fail(self, job_id: str, reason: str, **fields: Any) -> bool:
        return self.transition(job_id, FAILED, error=reason, **fields)

    def set_progress(self, job_id: str, **values: Any) -> bool:
        """Record progress values; False (nothing written) if the record is gone."""
        args: list[str | int] = [JOB_TTL_S]
        for name, value in values.items():
            args += [f"prog:{name}", json.dumps(value)]
        return bool(self._update(keys=[keys.job_key(job_id)], args=args))

    def bump_progress(self, job_id: str, name: str, amount: int = 1) -> int:
        """Add to a progress counter; 0 (nothing written) if the record is gone."""
        value = self._bump(keys=[keys.job_key(job_id)], args=[f"prog:{name}", amount, JOB_TTL_S])
        return int(value) if value is not None else 0

    def status_and_host(self, job_id: str) -> tuple[str | None, str | None]:
        """The state and host in one round trip (None, None: no such record)."""
        values: list[str | None] = self.client.hmget(keys.job_key(job_id), ["status", "host"])  # type: ignore[assignment]
        status, host = values
        return (status, host or None)

    def statuses(self, job_ids: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """`status_and_host` of many jobs in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job_key(job_id), ["status", "host"])
        found = {}
        for job_id, (status, host) in zip(job_ids, pipe.execute(), strict=True):
            found[job_id] = (status, host or None)
        return found

    # Six positional parameters: the signature callers already use.
    def record_step(  # noqa: PLR0917
        self,
        job_id: str,
        task: str,
        host: str,
        task_id: str,
        outcome: str,
        retries: int = 0,
        *,
        started: float | None = None,
    ) -> None:
        """Which host ran which step, when, and how it ended: facts tests, reports and
        benchmarks read back (`started` and `at` are wall-clock seconds)."""
        key = keys.job_steps_key(job_id)
        entry: dict[str, Any] = {
            "task": task,
            "host": host,
            "task_id": task_id,
            "retries": retries,
            "outcome": outcome,
            "at": time.time(),
        }
        if started is not None:
            entry["started"] = started
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(entry))
        pipe.expire(key, JOB_TTL_S)
        pipe.execute()

    def steps(self, job_id: str) -> list[dict[str, Any]]:
        items: list[str] = self.client.lrange(keys.job_steps_key(job_id), 0, -1)  # type: ignore[assignment]
        return [json.loads(item) for item in items]

    def status(self, job_id: str) -> str | None:
        """Just the state: what every step checks first, in one small round trip."""
        status: str | None = self.client.hget(keys.job_key(job_id), "status")  # type: ignore[assignment]
        return status

    def get(self, job_id: str) -> JobRecord:
        raw: dict[str, str] = self.client.hgetall(keys.job_key(job_id))  # type: ignore[assignment]
        if not raw:
            raise JobNotFoundError(job_id)
        return parse_record(job_id, raw)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 0.05) -> JobRecord:
        """Poll until the job ends; returns the last record seen when time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.get(job_id)
            if record.finished or time.monotonic() >= deadline:
                return record
            time.sleep(poll_s)
