"""A VM's job record: the state a client waits on, as stored in its Redis hash."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

QUEUED = "queued"
CONVERTING = "converting"
ATTACHING = "attaching"
SCANNING = "scanning"
MOUNTING = "mounting"
INSPECTING = "inspecting"
FIXING = "fixing"
DETACHING = "detaching"
BOOT_CHECKING = "boot_checking"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

# Every state above, for the report's schema (a new state goes in both places).
JobStatus = Literal[
    "queued",
    "converting",
    "attaching",
    "scanning",
    "mounting",
    "inspecting",
    "fixing",
    "detaching",
    "boot_checking",
    "done",
    "failed",
    "cancelled",
]
STATUSES: tuple[str, ...] = get_args(JobStatus)


class JobRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: str
    status: str
    image: str = ""
    host: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    timestamps: dict[str, float] = Field(default_factory=dict)
    progress: dict[str, Any] = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def parse_record(job_id: str, raw: Mapping[str, str]) -> JobRecord:
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
