"""The typed payloads: the plan's JSON, the job record, the manifest and report models."""

from __future__ import annotations

import json
from typing import Any, get_args

import pydantic
import pytest

from vmcraft_tasks import reports
from vmcraft_tasks.craft.guestcaps import GuestCaps
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.models import (
    BatchLimits,
    BatchPlan,
    DiskPlan,
    JobRecord,
    Manifest,
    VMPlan,
    VMReport,
    parse_record,
)
from vmcraft_tasks.models import job as job_model

DISK = DiskPlan(
    source="/src/a.vmdk", format="vmdk", virtual_size=1 << 30, target="/o/a-disk0.qcow2"
)
VM = VMPlan(id="a", disks=(DISK,), target_format="qcow2", output_dir="/o", host_group=("k1", "k2"))
PLAN = BatchPlan(batch="b", manifest_path="/m.yaml", limits=BatchLimits(max_parallel=2), vms=(VM,))


# --- the plan ---------------------------------------------------------------------


def test_plan_json_is_the_shape_workers_read() -> None:
    data = PLAN.to_dict()
    assert list(data) == ["batch", "manifest_path", "limits", "vms", "summary_dir", "summary_root"]
    assert data["limits"] == {"max_parallel": 2, "max_per_host": None}
    assert data["vms"][0] == {
        "id": "a",
        "disks": [
            {
                "source": "/src/a.vmdk",
                "format": "vmdk",
                "virtual_size": 1 << 30,
                "target": "/o/a-disk0.qcow2",
            }
        ],
        "target_format": "qcow2",
        "output_dir": "/o",
        "os": "auto",
        "fixes": True,
        "dry_run": False,
        "boot_check": False,
        "host": None,
        "host_group": ["k1", "k2"],
        "priority": 0,
        "memory_mib": 2048,
        "vcpus": 2,
        "network": "default",
        "output_root": None,
    }
    assert BatchPlan.from_dict(json.loads(json.dumps(data))) == PLAN


def test_plans_recorded_without_the_newer_keys_still_read() -> None:
    data = PLAN.to_dict()
    data["limits"] = None
    for key in ("os", "host", "output_root"):
        del data["vms"][0][key]
    plan = BatchPlan.from_dict(data)
    assert plan.limits == BatchLimits()
    assert (plan.vms[0].os, plan.vms[0].host, plan.vms[0].output_root) == ("auto", None, None)


def test_plans_are_frozen_and_hashable() -> None:
    with pytest.raises(pydantic.ValidationError):
        VM.id = "b"
    assert hash(PLAN) == hash(BatchPlan.from_dict(PLAN.to_dict()))


# --- the job record -----------------------------------------------------------------


def test_parse_record_reads_the_redis_hash() -> None:
    record = parse_record(
        "b.a",
        {
            "status": "done",
            "image": "/src/a.vmdk",
            "host": "",
            "at:queued": "1.5",
            "at:done": "9",
            "prog:conversions": '[{"target": "/o/a-disk0.qcow2"}]',
            "prog:note": "not json",
            "result": '{"roots": []}',
        },
    )
    assert record == JobRecord(
        job_id="b.a",
        status="done",
        image="/src/a.vmdk",
        timestamps={"queued": 1.5, "done": 9.0},
        progress={"conversions": [{"target": "/o/a-disk0.qcow2"}], "note": "not json"},
        result={"roots": []},
    )
    assert record.finished
    assert list(record.to_dict()) == [
        "job_id",
        "status",
        "image",
        "host",
        "error",
        "result",
        "timestamps",
        "progress",
    ]
    assert not parse_record("b.c", {}).finished  # no status yet: queued


def test_every_state_is_in_the_report_schema() -> None:
    states = {
        value
        for name, value in vars(job_model).items()
        if name.isupper() and isinstance(value, str)
    }
    assert states == set(job_model.STATUSES)
    assert job_model.TERMINAL.issubset(states)


# --- the manifest document ----------------------------------------------------------


def test_a_full_manifest_validates() -> None:
    manifest = Manifest.model_validate(
        {
            "batch": "wave-2",
            "limits": {"max_parallel": 3, "max_per_host": None},
            "defaults": {"target_format": "raw", "options": {"network": "mig"}},
            "vms": [
                {"id": "web01", "disks": ["/a.vmdk", {"path": "/b.vhdx"}], "options": None},
                {"id": "db01", "disks": ["/c.vdi"], "options": {"host_group": ["k1"]}},
            ],
        }
    )
    assert [d.path for d in manifest.vms[0].disks] == ["/a.vmdk", "/b.vhdx"]
    assert manifest.vms[1].options is not None
    assert manifest.vms[1].options.host_group == ["k1"]


@pytest.mark.parametrize(
    "bad",
    [
        {"vms": [{"id": "a", "disks": ["/a"]}]},
        {"batch": "..", "vms": [{"id": "a", "disks": ["/a"]}]},
        {"batch": "b", "vms": [{"id": "a b", "disks": ["/a"]}]},
        {"batch": "b", "vms": [{"id": "a", "disks": []}]},
        {"batch": "b", "vms": [{"id": "a", "disks": ["/a"], "output_dir": None}]},
        {"batch": "b", "vms": [{"id": "a", "disks": ["/a"], "options": {"vcpus": True}}]},
        {"batch": "b", "vms": [{"id": "a", "disks": ["/a"], "options": {"os": "linux"}}]},
        {
            "batch": "b",
            "vms": [{"id": "a", "disks": ["/a"], "options": {"host": "h", "host_group": ["h"]}}],
        },
        {"batch": "b", "limits": {"max_parallel": 0}, "vms": [{"id": "a", "disks": ["/a"]}]},
        {"batch": "b", "owner": "ops", "vms": [{"id": "a", "disks": ["/a"]}]},
    ],
)
def test_manifest_constraints(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Manifest.model_validate(bad)


# --- the report -----------------------------------------------------------------------


def test_report_version_is_the_schemas() -> None:
    assert get_args(VMReport.model_fields["report_version"].annotation) == (reports.REPORT_VERSION,)


def full_report(**changes: Any) -> dict[str, Any]:
    report = reports.vm_report(
        vm_id="web01",
        status="done",
        host="h1",
        timings={"convert": 2.5, "inspect": 1},
        disks=[reports.disk_entry(source="/s.vmdk", target="/o/web01-disk0.qcow2", format="qcow2")],
        os_facts=[OSInfo(root_partition=1, type="linux", distro="debian", major=12)],
        fixes=[reports.fix_entry(name="fstab", before="a", after="b", target="/etc/fstab")],
        mounts={1: "normal"},
        guestcaps=GuestCaps.compatibility("no virtio_blk").to_dict(),
    )
    return {**report, **changes}


def test_a_built_report_validates() -> None:
    report = VMReport.model_validate(full_report())
    assert report.os[0].distro == "debian"
    assert report.guestcaps is not None and report.guestcaps.block_bus == "sata"
    assert report.disks[0].format == "qcow2"


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "half-done"},
        {"vm_id": ""},
        {"total_s": -1.0},
        {"surprise": 1},
        {"disks": [{"source": "/s", "target": "/t", "format": "vmdk"}]},
        {"fixes": [{"name": "x", "before": 1, "after": 2, "applied": "yes"}]},
        {"guestcaps": {"block_bus": "ide", "net_model": "virtio"}},
    ],
)
def test_reports_that_drift_from_the_contract_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        VMReport.model_validate(full_report(**changes))


def test_a_missing_section_is_refused() -> None:
    report = full_report()
    del report["notes"]
    with pytest.raises(pydantic.ValidationError, match="notes"):
        VMReport.model_validate(report)
