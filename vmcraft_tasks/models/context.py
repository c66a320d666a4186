"""What travels between a VM's steps: its context, and the result the steps build up.

Both are task arguments and return values, serialized as JSON by Celery. A message is
untrusted input: `StepContext.from_message` validates one (a malformed message is
refused, not half-used), and nothing in it decides what a host may read or write — the
VM's plan comes from the batch record (`vmcraft_tasks.policy`). Unknown keys are
dropped: an older scheduler's `plan` key, or anything a forger adds, means nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmcraft_tasks.craft.mount.ladder import MountResult
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.probe import Filesystem

JOB_ID_PATTERN = r"^[A-Za-z0-9._-]{1,160}$"
ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class MessageInvalid(ValueError):
    """A step message that is not a VM context (the step refuses it)."""


class StepContext(BaseModel):
    """The VM as its steps know it. Each step returns a copy with what it learnt."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    # A batch VM names its batch and VM id; a lone inspection names neither.
    batch: str | None = Field(default=None, pattern=ID_PATTERN)
    vm_id: str | None = Field(default=None, pattern=ID_PATTERN)
    # The image a lone inspection asks for (checked against the image roots), or a
    # batch VM's first source (display only: the plan decides what is read).
    image: str | None = None
    readonly: bool = True
    # Set by the placing step: where the VM runs, and its attach state there.
    host: str | None = None
    state_dir: str | None = None
    conversions: list[dict[str, Any]] = Field(default_factory=list)
    partitions: list[Partition] = Field(default_factory=list)
    filesystems: list[Filesystem] = Field(default_factory=list)
    mount_targets: list[int] = Field(default_factory=list)
    # A mount subtask carries only what it needs, and how many mounts there are.
    to_mount: int = 0

    @property
    def in_batch(self) -> bool:
        return self.batch is not None

    @classmethod
    def from_message(cls, message: Any) -> StepContext:
        if isinstance(message, StepContext):
            return message
        try:
            return cls.model_validate(message)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            raise MessageInvalid(f"not a VM step message: {where}: {first['msg']}") from exc

    def to_message(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_(self, **changes: Any) -> StepContext:
        """A copy with `changes`, validated like a message."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def for_mount(self) -> StepContext:
        """What a mount subtask needs: twenty of them per VM add up."""
        return StepContext(
            job_id=self.job_id,
            batch=self.batch,
            vm_id=self.vm_id,
            host=self.host,
            state_dir=self.state_dir,
            to_mount=len(self.mount_targets),
        )


class VMResult(BaseModel):
    """The result of a VM: built up by inspect, fix and finalize; the job record's
    `result`, from which the per-VM report is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    host: str
    image: dict[str, Any]
    backend: str
    attach_attempts: int
    readonly: bool
    partitions: list[Partition]
    filesystems: list[Filesystem]
    mounts: dict[str, MountResult]
    roots: list[dict[str, Any]]
    # The VM as a whole (craft.guestvm): each disk with its partitions, every LV (how
    # it was exposed, or why not), every volume, and what the scan noted.
    disks: list[dict[str, Any]] = Field(default_factory=list)
    lvs: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    scan_notes: list[str] = Field(default_factory=list)
    # Why no OS root was found, in words (None: one was, or nobody looked).
    no_root: str | None = None
    # fix
    data_only: bool = False
    fixes: list[Any] = Field(default_factory=list)
    fix_notes: list[str] = Field(default_factory=list)
    fix_skipped: list[Any] = Field(default_factory=list)
    preparation: dict[str, Any] | None = None
    guestcaps: dict[str, Any] | None = None
    # finalize
    libvirt_xml: str | None = None
    conversions: list[dict[str, Any]] = Field(default_factory=list)
    # boot_check (options.boot_check)
    boot_check: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_(self, **changes: Any) -> VMResult:
        return type(self).model_validate({**self.model_dump(), **changes})


class MountOutcome(BaseModel):
    """One mount subtask's result: the chord body receives a list of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: int
    result: MountResult
