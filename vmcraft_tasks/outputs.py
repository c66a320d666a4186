"""What a migration leaves on disk: the libvirt domain XML and the JSON/Markdown reports."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vmcraft_tasks.craft.guestcaps import caps_or_unknown
from vmcraft_tasks.craft.libvirt import (
    DiskSpec,
    DomainSpec,
    NetSpec,
    defaults_from_guest,
    render_domain,
    validate_domain_xml,
)
from vmcraft_tasks.jobs import JobRecord
from vmcraft_tasks.reports import batch_summary, disk_entry, fix_entry, vm_report, write_reports

ESP_TYPES = frozenset({"c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "ef"})

# Job states in the order a migration passes them; a step lasts until the next state.
STEP_OF_STATE = {
    "converting": "convert",
    "attaching": "attach",
    "scanning": "scan",
    "mounting": "mount",
    "inspecting": "inspect",
    "fixing": "fix",
    "detaching": "detach",
}


def has_esp(partitions: Sequence[Mapping[str, Any]]) -> bool:
    return any(str(p.get("type", "")).lower() in ESP_TYPES for p in partitions)


def domain_spec(vm: Mapping[str, Any], report: Mapping[str, Any]) -> DomainSpec:
    """The KVM domain for a migrated VM (pure): its converted disks, and devices from
    what the guest can use (`report["guestcaps"]`, a `GuestCaps.to_dict()` of the guest
    after its fixes). A report without them gets SATA and e1000e, which boot without
    virtio drivers, and the XML's metadata says why."""
    disks = [
        DiskSpec(path=d["target"], format=vm["target_format"], target_dev=f"vd{chr(ord('a') + i)}")
        for i, d in enumerate(vm["disks"])
    ]
    roots = report.get("roots") or []
    os_info = dict(roots[0]) if roots else None
    spec = DomainSpec(
        name=vm["id"],
        memory_mib=int(vm["memory_mib"]),
        vcpus=int(vm["vcpus"]),
        disks=disks,
        networks=[NetSpec(network=vm.get("network") or "default")],
        os_info=os_info,
    )
    caps = caps_or_unknown(report.get("guestcaps"))
    return defaults_from_guest(os_info, has_esp(report.get("partitions") or []), caps).apply(spec)


def write_domain_xml(vm: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """Write `<output_dir>/<vm>.xml`, checked against libvirt's schema when the validator
    is installed; returns its path."""
    spec = domain_spec(vm, report)
    xml = render_domain(spec)
    if shutil.which("virt-xml-validate"):
        validate_domain_xml(xml)
    path = os.path.join(vm["output_dir"], f"{vm['id']}.xml")
    _atomic_write(path, xml)
    return path


def step_timings(timestamps: Mapping[str, float]) -> dict[str, float]:
    """Seconds per step, from when the job entered each state (pure)."""
    ordered = sorted(timestamps.items(), key=lambda kv: kv[1])
    timings: dict[str, float] = {}
    for (state, at), (_next_state, next_at) in itertools.pairwise(ordered):
        step = STEP_OF_STATE.get(state)
        if step:
            timings[step] = timings.get(step, 0.0) + max(0.0, next_at - at)
    return timings


def vm_report_for(vm: Mapping[str, Any], record: JobRecord) -> dict[str, Any]:
    result = record.result or {}
    conversions = {c.get("target"): c for c in result.get("conversions") or []}
    conversions.update({c.get("target"): c for c in record.progress.get("conversions") or []})
    disks = []
    for disk in vm["disks"]:
        done = conversions.get(disk["target"], {})
        disks.append(
            disk_entry(
                source=disk["source"],
                target=disk["target"],
                format=vm["target_format"],
                source_format=disk.get("format"),
                virtual_size=disk.get("virtual_size") or None,
                target_size=done.get("target_bytes"),
                conversion_s=done.get("seconds"),
                source_identity=done.get("source_identity"),
                source_unchanged=done.get("source_unchanged"),
            )
        )
    fixes = [
        fix_entry(
            name=f.get("name", "fix"),
            target=f.get("path"),
            before=f.get("before"),
            after=f.get("after"),
            applied=bool(f.get("changed", True)) and not vm.get("dry_run"),
            note=f.get("note"),
        )
        for f in result.get("fixes") or []
    ]
    return vm_report(
        vm_id=vm["id"],
        status=record.status,
        error=record.error,
        host=record.host,
        timings=step_timings(record.timestamps),
        disks=disks,
        partitions=result.get("partitions") or [],
        filesystems=result.get("filesystems") or [],
        mounts=result.get("mounts") or {},
        os_facts=result.get("roots") or [],
        fixes=fixes,
        libvirt_xml=result.get("libvirt_xml"),
        data_only=bool(result.get("data_only")),
        guestcaps=result.get("guestcaps"),
        initramfs=(result.get("preparation") or {}).get("initramfs"),
        notes=result.get("fix_notes") or [],
    )


def write_vm_report(vm: Mapping[str, Any], record: JobRecord, _steps: Any = None) -> str:
    path = os.path.join(vm["output_dir"], f"{vm['id']}.json")
    _atomic_write(path, json.dumps(vm_report_for(vm, record), indent=2, sort_keys=True) + "\n")
    return path


def summary_dir(plan: Mapping[str, Any]) -> str:
    """Where the batch summary goes: the directory all VM outputs share."""
    return str(os.path.commonpath([vm["output_dir"] for vm in plan["vms"]]))


def write_batch_summary(
    plan: Mapping[str, Any],
    records: Mapping[str, JobRecord],
    _steps: Any = None,
    *,
    started_at: float,
) -> dict[str, Any]:
    reports = [vm_report_for(vm, records[vm["id"]]) for vm in plan["vms"]]
    finished = max(
        (max(r.timestamps.values()) for r in records.values() if r.timestamps),
        default=time.time(),
    )
    summary = batch_summary(plan["batch"], reports, started_at or finished, finished)
    directory = summary_dir(plan)
    write_reports(directory, reports, summary)
    return {**summary, "reports_dir": directory}


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
