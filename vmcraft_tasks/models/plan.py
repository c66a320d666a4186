"""The batch plan: what the client checked, and what travels to the workers.

A manifest is read once, on the submitting side (`scheduler.manifest`), into a
BatchPlan. The plan, not the manifest, is stored in Redis as JSON and read back by
the workers; `to_dict()` is that JSON, `from_dict()` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls.model_validate(data)


class BatchLimits(_Plan):
    max_parallel: int | None = None  # VMs of the batch in flight at once; None: no limit
    max_per_host: int | None = None


class DiskPlan(_Plan):
    source: str  # absolute and symlink-free: the file the roots check approved
    format: str
    virtual_size: int  # 0 when the manifest was read with check_files=False
    target: str


class VMPlan(_Plan):
    id: str
    disks: tuple[DiskPlan, ...]
    target_format: str
    output_dir: str
    os: str = "auto"
    fixes: bool = True
    dry_run: bool = False
    boot_check: bool = False
    host: str | None = None
    host_group: tuple[str, ...] | None = None
    priority: int = 0
    memory_mib: int = 2048
    vcpus: int = 2
    network: str = "default"
    # The output root (resolved) the client checked output_dir against; a worker without
    # VMCRAFT_OUTPUT_ROOTS of its own checks every path it writes against this one.
    output_root: str | None = None

    def step_options(self) -> dict[str, bool]:
        """The options that switch optional pipeline steps on (`pipeline.Step.option`)."""
        return {"boot_check": self.boot_check}


class BatchPlan(_Plan):
    batch: str
    manifest_path: str | None
    limits: BatchLimits = Field(default_factory=BatchLimits)
    vms: tuple[VMPlan, ...]
    # The one folder the batch summary goes to, and the output root it was checked under.
    summary_dir: str | None = None
    summary_root: str | None = None

    @field_validator("limits", mode="before")
    @classmethod
    def _no_limits(cls, value: object) -> object:
        return {} if value is None else value

    def vms_by_priority(self) -> tuple[VMPlan, ...]:
        """Higher priority first; equal priorities keep manifest order (sorted is stable)."""
        return tuple(sorted(self.vms, key=lambda vm: -vm.priority))
