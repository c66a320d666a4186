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

# Moves the job to a new status unless it already ended (or its record is gone);
# returns 1 when it moved. `done` drops the error a failed attempt may have left.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then
  return 0
end
if current == 'done' or current == 'failed' or current == 'cancelled' then
  return 0
end
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[2] == 'done' then
  redis.call('HDEL', KEYS[1], 'error')
end
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl') or '1209600'))
return 1
"""

# Sets fields of an existing record only; returns 1 when it did.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""

# Adds to a counter of an existing record; returns the new value, or nil.
_BUMP = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
return redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
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
        self._update = client.register_script(_UPDATE)
        self._bump = client.register_script(_BUMP)

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
        pipe = self.client.pipeline()  # MULTI: nobody sees the record missing
        pipe.delete(_key(job_id))
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

    def set_progress(self, job_id: str, **values: Any) -> bool:
        """Record progress values; False (nothing written) if the record is gone."""
        args: list[str] = []
        for name, value in values.items():
            args += [f"prog:{name}", json.dumps(value)]
        return bool(self._update(keys=[_key(job_id)], args=args))

    def bump_progress(self, job_id: str, name: str, amount: int = 1) -> int:
        """Add to a progress counter; 0 (nothing written) if the record is gone."""
        value = self._bump(keys=[_key(job_id)], args=[f"prog:{name}", amount])
        return int(value) if value is not None else 0

    def status_and_host(self, job_id: str) -> tuple[str | None, str | None]:
        """The state and host in one round trip (None, None: no such record)."""
        status, host = self.client.hmget(_key(job_id), ["status", "host"])
        return (
            _text(status) if status is not None else None,
            _text(host) if host else None,
        )

    def statuses(self, job_ids: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """`status_and_host` of many jobs in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(_key(job_id), ["status", "host"])
        found = {}
        for job_id, (status, host) in zip(job_ids, pipe.execute(), strict=True):
            found[job_id] = (
                _text(status) if status is not None else None,
                _text(host) if host else None,
            )
        return found

    # Six positional parameters: the signature callers already use.
    def record_step(  # noqa: PLR0917
        self, job_id: str, task: str, host: str, task_id: str, outcome: str, retries: int = 0
    ) -> None:
        """Which host ran which step, and how it ended: facts tests and reports read back."""
        key = _key(job_id) + ":steps"
        entry = json.dumps(
            {
                "task": task,
                "host": host,
                "task_id": task_id,
                "retries": retries,
                "outcome": outcome,
                "at": time.time(),
            }
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
