"""The host's own record of the VM steps its processes run: who, since when, how it ended.

Every step writes a small file when it starts (`running/`) and moves it to `done/`
with its outcome when it ends. The files live in the host's work directory, not in
Redis, for two reasons:

- They must survive exactly the failures this record is for: a Redis restart (empty
  or not) and a process killed with -9. A step whose file is still in `running/`
  while its process is gone died mid-step; the reconciler frees what it held.
- A redelivered message (a step restored after its worker died, or a message whose
  acknowledgement was lost with a broker connection) must not run a step again that
  already ran to the end here: `completed()` answers that without a broker round trip.

A delivery is named by task name, task id and retry count together: a step that hands
its VM on with `replace()` passes its task id to the next step, so one id names
several steps of a VM. A holder (`Holder`) names one step run by one process: host,
pid, the process's start time, the task name and the task id. Semaphore places and
conversion records carry it, so the reconciler can tell a live holder from a dead one
by looking at this host only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from vmcraft_tasks.craft.atomicfile import atomic_write
from worker import procs

log = logging.getLogger(__name__)

STEPS_DIR = "steps"
RUNNING = "running"
DONE = "done"

# Outcomes after which a second delivery of the same message must not run the step
# again. "retry" counts: the retry went out as a new message (retries + 1).
COMPLETED = frozenset({"done", "failed", "replaced", "retry", "cancelled", "skipped", "stopped"})
DIED = "died"

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Holder:
    """One step run by one process on one host."""

    host: str
    pid: int
    pid_start: int | None
    task_id: str
    job_id: str = ""
    task: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        """What a live step is looked up by: (task name, task id, pid)."""
        return (self.task, self.task_id, self.pid)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Holder | None:
        try:
            data = json.loads(raw)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
                task_id=str(data["task_id"]),
                job_id=str(data.get("job_id") or ""),
                task=str(data.get("task") or ""),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def process_alive(self) -> bool:
        return procs.same_process(self.pid, self.pid_start)


@dataclass(frozen=True)
class StepRecord:
    task_id: str
    retries: int
    task: str
    job_id: str
    host: str
    pid: int
    pid_start: int | None
    worker_pid: int
    started: float
    deadline: float
    outcome: str | None = None
    ended: float | None = None

    @property
    def holder(self) -> Holder:
        return Holder(self.host, self.pid, self.pid_start, self.task_id, self.job_id, self.task)

    @property
    def key(self) -> str:
        return step_key(self.task, self.task_id, self.retries)


def step_key(task: str, task_id: str, retries: int) -> str:
    """A file name for one delivery of one step (pure)."""
    name = _SAFE.sub("_", task.rsplit(".", 1)[-1])[:40]
    return f"{name}~{_SAFE.sub('_', task_id)[:200]}~{int(retries)}"


# The step this process is running now: semaphore places taken inside it name it.
_current: contextvars.ContextVar[Holder | None] = contextvars.ContextVar(
    "vmcraft_step_holder", default=None
)


def current_holder() -> Holder | None:
    return _current.get()


class StepLedger:
    """The step files of one host (`<host work dir>/steps`)."""

    def __init__(self, host_work_dir: str) -> None:
        self.root = os.path.join(host_work_dir, STEPS_DIR)
        self.running_dir = os.path.join(self.root, RUNNING)
        self.done_dir = os.path.join(self.root, DONE)

    def _ensure(self) -> None:
        os.makedirs(self.running_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.done_dir, mode=0o700, exist_ok=True)

    def begin(self, record: StepRecord) -> None:
        self._ensure()
        _write(os.path.join(self.running_dir, record.key + ".json"), record)

    def end(self, record: StepRecord, outcome: str) -> None:
        """Move the step to `done/` with its outcome (the running file goes last, so a
        crash in between leaves a record that still says it ran)."""
        self._ensure()
        ended = replace(record, outcome=outcome, ended=time.time())
        _write(os.path.join(self.done_dir, record.key + ".json"), ended)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.running_dir, record.key + ".json"))

    def completed(self, task: str, task_id: str, retries: int) -> StepRecord | None:
        """The finished run of this delivery, if it ran to an end here."""
        record = _read(os.path.join(self.done_dir, step_key(task, task_id, retries) + ".json"))
        return record if record is not None and record.outcome in COMPLETED else None

    def previous(self, task: str, task_id: str, retries: int) -> StepRecord | None:
        """Whatever this host knows about an earlier run of this delivery."""
        key = step_key(task, task_id, retries) + ".json"
        return _read(os.path.join(self.done_dir, key)) or _read(os.path.join(self.running_dir, key))

    def running(self) -> list[StepRecord]:
        """Steps that started and have not ended (their process may be dead)."""
        return [r for r in _read_dir(self.running_dir) if r.outcome is None]

    def mark_died(self, record: StepRecord) -> None:
        """The step's process is gone: keep the record, as `died`."""
        self.end(record, DIED)

    def prune(self, older_than_s: float) -> int:
        """Forget finished steps older than `older_than_s`; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            names = os.listdir(self.done_dir)
        except FileNotFoundError:
            return 0
        for name in names:
            path = os.path.join(self.done_dir, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


@contextlib.contextmanager
def holding(holder: Holder) -> Iterator[None]:
    """Make `holder` the current step of this thread for the block."""
    token = _current.set(holder)
    try:
        yield
    finally:
        _current.reset(token)


def _write(path: str, record: StepRecord) -> None:
    atomic_write(path, json.dumps(asdict(record)), fsync=False)


def _read(path: str) -> StepRecord | None:
    try:
        with open(path) as fh:
            data: dict[str, Any] = json.load(fh)
        return StepRecord(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("unreadable step record %s: %s", path, exc)
        return None


def _read_dir(directory: str) -> list[StepRecord]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.endswith(".json"):
            record = _read(os.path.join(directory, name))
            if record is not None:
                found.append(record)
    return found
