"""Per-VM job records in Redis: state, host, timestamps, reason for a failure, result.

A record is the truth a client waits on: a Celery result can stay pending forever
when the worker holding it dies, but the reconciler of the restarted host marks
the job failed with a reason. Terminal states are sticky: a late step of a failed
VM can never turn it back into "done".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

JOB_PREFIX = "vmcraft:v1:job:"
JOB_TTL_S = 14 * 24 * 3600

QUEUED = "queued"
CONVERTING = "converting"
ATTACHING = "attaching"
SCANNING = "scanning"
MOUNTING = "mounting"
INSPECTING = "inspecting"
FIXING = "fixing"
DETACHING = "detaching"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

# Moves the job to a new status unless it already ended; returns 1 when it moved.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if current == 'done' or current == 'failed' or current == 'cancelled' then
  return 0
end
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl') or '1209600'))
return 1
"""


class JobNotFoundError(KeyError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    status: str
    image: str = ""
    host: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    timestamps: dict[str, float] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "image": self.image,
            "host": self.host,
            "error": self.error,
            "result": self.result,
            "timestamps": self.timestamps,
            "progress": self.progress,
        }


def _key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def parse_record(job_id: str, raw: dict[str, str]) -> JobRecord:
    """Build a record from the Redis hash (pure)."""
    stamps = {k[3:]: float(v) for k, v in raw.items() if k.startswith("at:")}
    progress = {k[5:]: _maybe_json(v) for k, v in raw.items() if k.startswith("prog:")}
    return JobRecord(
        job_id=job_id,
        status=raw.get("status", QUEUED),
        image=raw.get("image", ""),
        host=raw.get("host") or None,
        error=raw.get("error") or None,
        result=json.loads(raw["result"]) if raw.get("result") else None,
        timestamps=stamps,
        progress=progress,
    )


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._transition = client.register_script(_TRANSITION)

    def create(self, job_id: str, image: str, **fields: str) -> None:
        now = time.time()
        mapping: dict[Any, Any] = {
            "status": QUEUED,
            "image": image,
            f"at:{QUEUED}": str(now),
            **fields,
        }
        pipe = self.client.pipeline()
        pipe.hset(_key(job_id), mapping=mapping)
        pipe.expire(_key(job_id), JOB_TTL_S)
        pipe.execute()

    def transition(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move to `status` (recording when); False if the job had already ended."""
        args: list[str] = ["status", status, f"at:{status}", repr(time.time())]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else json.dumps(value)]
        return bool(self._transition(keys=[_key(job_id)], args=args))

    def fail(self, job_id: str, reason: str, **fields: Any) -> bool:
        return self.transition(job_id, FAILED, error=reason, **fields)

    def set_progress(self, job_id: str, **values: Any) -> None:
        mapping: dict[Any, Any] = {f"prog:{k}": json.dumps(v) for k, v in values.items()}
        self.client.hset(_key(job_id), mapping=mapping)

    def bump_progress(self, job_id: str, name: str, amount: int = 1) -> int:
        return int(self.client.hincrby(_key(job_id), f"prog:{name}", amount))

    def record_step(self, job_id: str, task: str, host: str, task_id: str, outcome: str) -> None:
        """Which host ran which step, and how it ended: facts tests and reports read back."""
        key = _key(job_id) + ":steps"
        entry = json.dumps(
            {"task": task, "host": host, "task_id": task_id, "outcome": outcome, "at": time.time()}
        )
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, entry)
        pipe.expire(key, JOB_TTL_S)
        pipe.execute()

    def steps(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(_key(job_id) + ":steps", 0, -1)]

    def status(self, job_id: str) -> str | None:
        """Just the state: what every step checks first, in one small round trip."""
        raw = self.client.hget(_key(job_id), "status")
        return _text(raw) if raw is not None else None

    def get(self, job_id: str) -> JobRecord:
        raw = self.client.hgetall(_key(job_id))
        if not raw:
            raise JobNotFoundError(job_id)
        decoded = {_text(k): _text(v) for k, v in raw.items()}
        return parse_record(job_id, decoded)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 0.05) -> JobRecord:
        """Poll until the job ends; returns the last record seen when time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.get(job_id)
            if record.finished or time.monotonic() >= deadline:
                return record
            time.sleep(poll_s)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
