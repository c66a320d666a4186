"""The per-VM JSON report (`<output_dir>/<vm>.json`): a contract for orchestrators.

`vmcraft_tasks.reports.vm_report` builds it; `vmcraft_tasks.outputs` validates every
report against VMReport before writing it, so the published schema
(`vmcraft-tasks schema report`, docs/schemas/vm-report.schema.json) is what is written.
Sections whose content is the library's own detail (partitions, filesystems, mounts,
fstab entries) are open mappings; the rest is typed and closed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vmcraft_tasks.craft.fixes.initramfs_regen import Action, Outcome
from vmcraft_tasks.craft.guestcaps import BlockBus, NetModel
from vmcraft_tasks.craft.inspect.model import OSType
from vmcraft_tasks.models.job import JobStatus

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Bytes = Annotated[int, Field(ge=0)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DiskReport(_Closed):
    """One converted disk; sizes in bytes (allocated on the host for source/target)."""

    source: str
    source_format: str | None = None
    target: str
    format: Literal["qcow2", "raw"]
    virtual_size: Bytes | None = None
    source_size: Bytes | None = None
    target_size: Bytes | None = None
    conversion_s: Seconds | None = None
    source_identity: str | None = Field(None, description="what proved the source untouched")
    source_unchanged: bool | None = Field(None, description="None: not checked")
    # What the inspection found on this disk (null: it was not inspected).
    partitions: list[dict[str, Any]] | None = Field(
        None, description="this disk's own partition table, numbered as on the disk"
    )
    backend: str | None = Field(None, description="how the disk was attached")
    attach_attempts: int | None = None


class LVReport(_Closed):
    """One logical volume of the VM: how it was exposed, or why it was not."""

    vg: str
    vg_uuid: str
    lv: str
    lv_uuid: str
    size: Bytes
    volume: int = Field(description="its volume number (the key of `mounts`)")
    method: Literal["loop", "nbdkit", "dm"] | None = Field(
        None, description="null when not exposed"
    )
    device: str | None = None
    reason: str | None = Field(None, description="why it was not exposed")


class FixReport(_Closed):
    """One change made (or, in a dry run, not made) to the guest."""

    name: str
    target: str | None = None
    applied: bool = True
    before: Any = None
    after: Any = None
    note: str | None = None


class OSReport(_Closed):
    """One operating system root found on the VM's disks; unknown facts are null."""

    root_partition: int
    type: OSType
    distro: str | None = None
    product_name: str | None = None
    major: int | None = None
    minor: int | None = None
    arch: str | None = None
    hostname: str | None = None
    package_format: str | None = None
    package_management: str | None = None
    build: str | None = None
    edition: str | None = None
    fstab: list[dict[str, Any]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class GuestCapsReport(_Closed):
    """The devices the domain got, and why (every compatibility choice has a reason)."""

    block_bus: BlockBus
    net_model: NetModel
    virtio_blk: bool
    virtio_net: bool
    reasons: list[str] = Field(default_factory=list)
    evidence: list[str] = Field(default_factory=list)


class KernelReport(_Closed):
    """What happened (or would happen, in a dry run) to one kernel's initramfs."""

    kernel: str
    initrd: str
    generator: str
    action: Action
    ok: bool
    modules_before: list[str]
    modules_after: list[str] | None
    virtio_blk_before: bool
    virtio_blk_after: bool | None
    builtin: bool
    backup: str | None
    verified: bool
    seconds: Seconds
    output_tail: str = ""
    reason: str | None = None
    notes: list[str] = Field(default_factory=list)
    lvm_before: bool | None = Field(
        None, description="the image held the lvm binary (null: the root needs no LVM)"
    )
    lvm_after: bool | None = None


class InitramfsReport(_Closed):
    """The initramfs outcome for every bootable kernel of the guest."""

    outcome: Outcome
    ok: bool
    dry_run: bool
    generator: str
    arch: str
    modules_policy: str | None
    kernels: list[KernelReport] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    lvm: str | None = Field(None, description="what was done so the images activate LVM")


class BootCheckReport(_Closed):
    """The headless boot of the migrated disks (options.boot_check)."""

    result: Literal["pass", "fail", "skipped"]
    mode: str = Field(
        description="bootloader, direct-kernel (the guest's own kernel booted directly: "
        "its bootloader was bypassed) or windows-stable-run"
    )
    firmware: str | None = None
    accel: str | None = Field(None, description="kvm or tcg")
    seconds: Seconds | None = None
    evidence: list[str] = Field(default_factory=list, description="the deciding console lines")
    reason: str | None = None
    notes: list[str] = Field(default_factory=list, description="what was and was not verified")
    serial_log: str | None = Field(None, description="the cleaned console, next to the report")


class VMReport(_Closed):
    """The report of one VM of a batch, written when the VM ends."""

    model_config = ConfigDict(title="vmcraft-tasks VM report")

    report_version: Literal[1]
    vm_id: Annotated[str, Field(min_length=1)]
    status: JobStatus
    error: str | None
    host: str | None
    timings: dict[str, Seconds] = Field(description="seconds per step, in the order they ran")
    total_s: Seconds | None = Field(description="null when no step ran")
    disks: list[DiskReport]
    partitions: list[dict[str, Any]]
    filesystems: list[dict[str, Any]]
    mounts: dict[str, dict[str, Any]] = Field(
        description="by volume number: a partition of the boot disk keeps its number, "
        "partition p of disk k (k >= 1, counted from 0) is k*1000+p, LVs from 100000"
    )
    lvs: list[LVReport] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="every volume with a filesystem, labelled"
    )
    scan_notes: list[str] = Field(
        default_factory=list, description="what the scan could not use, and why"
    )
    os: list[OSReport]
    fixes: list[FixReport]
    guestcaps: GuestCapsReport | None
    initramfs: InitramfsReport | None
    data_only: bool
    notes: list[str]
    libvirt_xml: str | None = Field(description="the domain XML's path")
    boot_check: BootCheckReport | None = None
