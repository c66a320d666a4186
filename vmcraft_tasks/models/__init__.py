"""Typed payloads of the fleet (pydantic v2): the manifest as written, the batch plan,
the job record and the per-VM report. The manifest and the report publish their JSON
Schemas (`vmcraft-tasks schema manifest|report`, docs/schemas/)."""

from vmcraft_tasks.models.job import TERMINAL, JobRecord, JobStatus, parse_record
from vmcraft_tasks.models.manifest import VM as ManifestVM
from vmcraft_tasks.models.manifest import Defaults, Disk, Limits, Manifest, Options
from vmcraft_tasks.models.plan import BatchLimits, BatchPlan, DiskPlan, VMPlan
from vmcraft_tasks.models.report import (
    DiskReport,
    FixReport,
    GuestCapsReport,
    InitramfsReport,
    KernelReport,
    OSReport,
    VMReport,
)

__all__ = [
    "TERMINAL",
    "BatchLimits",
    "BatchPlan",
    "Defaults",
    "Disk",
    "DiskPlan",
    "DiskReport",
    "FixReport",
    "GuestCapsReport",
    "InitramfsReport",
    "JobRecord",
    "JobStatus",
    "KernelReport",
    "Limits",
    "Manifest",
    "ManifestVM",
    "OSReport",
    "Options",
    "VMPlan",
    "VMReport",
    "parse_record",
]
