"""What a migration leaves on disk: the libvirt domain XML and the JSON/Markdown reports.

Every file is written through `outfiles.OutputDir`: into a folder checked against the
output roots (this process's `VMCRAFT_OUTPUT_ROOTS` when set, else the root the client
recorded in the batch plan), never through a symlink, never over a file the tool did not
make. Callers pass `settings_roots` (their FleetSettings.output_roots); None reads them
from the environment, so a caller that forgets still checks against its own settings.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vmcraft_tasks.config import FleetSettings
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
from vmcraft_tasks.models.report import VMReport
from vmcraft_tasks.outfiles import (
    OutputDir,
    OutputNameError,
    OutputPathError,
    check_output_dir,
    check_vm_id,
    disk_file_name,
    output_roots_for,
)
from vmcraft_tasks.reports import (
    batch_summary,
    disk_entry,
    fix_entry,
    report_filename,
    vm_report,
    write_reports,
)

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
    "boot_checking": "boot_check",
}


TARGET_FORMATS = ("qcow2", "raw")


# --- where a VM writes ----------------------------------------------------------------


def _own_roots(settings_roots: Sequence[str] | None) -> tuple[str, ...]:
    if settings_roots is None:
        return FleetSettings.from_env().output_roots
    return tuple(settings_roots)


def vm_output_roots(
    vm: Mapping[str, Any], *, settings_roots: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The roots every path a VM writes is checked against: the caller's own output
    roots when set, else the one the client recorded in the VM's plan."""
    return output_roots_for(_own_roots(settings_roots), vm.get("output_root"))


def check_vm_outputs(vm: Mapping[str, Any], *, settings_roots: Sequence[str] | None = None) -> str:
    """Check where a VM will write, as this host sees it; returns its output folder.

    The id must not take one of the tool's names, the folder must be allowed under the
    roots, and each disk target must be `<folder>/<vm>-disk<N>.<format>`, so a plan
    cannot name any other file. Raises OutputError (a ValueError) with a one-line reason.
    """
    vm_id = check_vm_id(vm.get("id"))
    folder = check_output_dir(vm["output_dir"], vm_output_roots(vm, settings_roots=settings_roots))
    fmt = vm.get("target_format")
    if fmt not in TARGET_FORMATS:
        raise OutputNameError(f"VM {vm_id}: unsupported target format {fmt!r}")
    for index, disk in enumerate(vm["disks"]):
        expected = os.path.join(folder, disk_file_name(vm_id, index, str(fmt)))
        if os.path.normpath(str(disk["target"])) != expected:
            raise OutputPathError(
                f"VM {vm_id}: disk {index} target {disk['target']} is not {expected}",
                path=str(disk["target"]),
            )
    return folder


def open_vm_output_dir(
    vm: Mapping[str, Any], *, settings_roots: Sequence[str] | None = None
) -> OutputDir:
    """The VM's output folder, checked and opened (created 0750 when missing)."""
    check_vm_id(vm.get("id"))
    return OutputDir.open(vm["output_dir"], vm_output_roots(vm, settings_roots=settings_roots))


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


def write_domain_xml(
    vm: Mapping[str, Any],
    report: Mapping[str, Any],
    *,
    settings_roots: Sequence[str] | None = None,
) -> str:
    """Write `<output_dir>/<vm>.xml`, checked against libvirt's schema when the validator
    is installed; returns its path. Raises OutputError when it cannot go there."""
    spec = domain_spec(vm, report)
    xml = render_domain(spec)
    if shutil.which("virt-xml-validate"):
        validate_domain_xml(xml)
    with open_vm_output_dir(vm, settings_roots=settings_roots) as out:
        return out.write_text(f"{vm['id']}.xml", xml, kind="xml")


def serial_log_name(vm_id: str) -> str:
    return f"{vm_id}.serial.log"


def write_serial_log(
    vm: Mapping[str, Any], text: str, *, settings_roots: Sequence[str] | None = None
) -> str:
    """Keep a boot check's cleaned console next to the VM's report; returns its path."""
    with open_vm_output_dir(vm, settings_roots=settings_roots) as out:
        return out.write_text(serial_log_name(vm["id"]), text, kind="log")


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
    inspected = result.get("disks") or []
    for index, disk in enumerate(vm["disks"]):
        done = conversions.get(disk["target"], {})
        found = inspected[index] if index < len(inspected) else {}
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
            | (
                {
                    "partitions": found.get("partitions"),
                    "backend": found.get("backend"),
                    "attach_attempts": found.get("attach_attempts"),
                }
                if found
                else {}
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
    report = vm_report(
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
        lvs=result.get("lvs") or [],
        volumes=result.get("volumes") or [],
        scan_notes=result.get("scan_notes") or [],
        boot_check=result.get("boot_check"),
    )
    # The report is a published contract (docs/schemas/vm-report.schema.json): one that
    # does not match it is a bug here, and is never written.
    VMReport.model_validate(report)
    return report


def write_vm_report(
    vm: Mapping[str, Any],
    record: JobRecord,
    _steps: Any = None,
    *,
    settings_roots: Sequence[str] | None = None,
) -> str:
    """Write `<output_dir>/<vm>.json`; returns its path. Raises OutputError when it
    cannot go there."""
    text = json.dumps(vm_report_for(vm, record), indent=2, sort_keys=True) + "\n"
    with open_vm_output_dir(vm, settings_roots=settings_roots) as out:
        return out.write_text(report_filename(vm["id"]), text, kind="report")


def summary_location(plan: Mapping[str, Any]) -> tuple[str, str | None]:
    """(folder, recorded output root) of the batch summary: the ONE place the manifest
    loader chose. Plans recorded before it did get the same rule: the VMs' folder when
    they share one, else `<first VM's output root>/<batch>`; never a common parent."""
    if plan.get("summary_dir"):
        return str(plan["summary_dir"]), plan.get("summary_root")
    vms = plan["vms"]
    first = vms[0]
    root = first.get("output_root")
    if all(vm["output_dir"] == first["output_dir"] for vm in vms):
        return str(first["output_dir"]), root
    if not root:
        raise OutputPathError(f"batch {plan['batch']}: its plan records no summary folder")
    return os.path.join(root, plan["batch"]), root


def summary_dir(plan: Mapping[str, Any]) -> str:
    """Where the batch summary goes (see `summary_location`)."""
    return summary_location(plan)[0]


def write_batch_summary(
    plan: Mapping[str, Any],
    records: Mapping[str, JobRecord],
    _steps: Any = None,
    *,
    started_at: float,
    settings_roots: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write every VM's report and summary.json/summary.md into the summary folder;
    returns the summary with `reports_dir`. Raises OutputError (nothing written) when a
    file the tool did not make is in the way, or the folder is not allowed."""
    reports = [vm_report_for(vm, records[vm["id"]]) for vm in plan["vms"]]
    finished = max(
        (max(r.timestamps.values()) for r in records.values() if r.timestamps),
        default=time.time(),
    )
    summary = batch_summary(plan["batch"], reports, started_at or finished, finished)
    directory, recorded_root = summary_location(plan)
    roots = output_roots_for(_own_roots(settings_roots), recorded_root)
    written = write_reports(directory, reports, summary, roots=roots)
    return {**summary, "reports_dir": os.path.dirname(written[-1])}
