"""The published JSON Schemas: docs/schemas/ is what the models generate, the CLI prints
it, README's manifests validate against it, and a real report matches it."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler import cli
from vmcraft_tasks import outputs
from vmcraft_tasks.craft.guestcaps import GuestCaps
from vmcraft_tasks.craft.inspect.model import OSInfo
from vmcraft_tasks.jobs import JobRecord
from vmcraft_tasks.models import VMReport
from vmcraft_tasks.models.schemas import SCHEMAS, json_schema, schema_text

REPO = Path(__file__).resolve().parents[2]
FILES = {"manifest": "manifest.schema.json", "report": "vm-report.schema.json"}
GIB = 1 << 30


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_published_schema_is_what_the_models_generate(name: str) -> None:
    path = REPO / "docs" / "schemas" / FILES[name]
    assert path.read_text() == schema_text(name), (
        f"{path.relative_to(REPO)} is stale; regenerate it with "
        f"`vmcraft-tasks schema {name} > docs/schemas/{FILES[name]}`"
    )


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cli_prints_the_schema(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema", name]) == 0
    assert capsys.readouterr().out == schema_text(name)


def validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def readme_manifests() -> list[Any]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    return [
        data for data in map(yaml.safe_load, blocks) if isinstance(data, dict) and "vms" in data
    ]


def test_readme_manifests_validate_against_the_schema() -> None:
    check = validator("manifest")
    manifests = readme_manifests()
    assert manifests, "README shows no manifest"
    for manifest in manifests:
        check.validate(manifest)


def test_a_full_manifest_validates_and_mistakes_do_not() -> None:
    check = validator("manifest")
    manifest: dict[str, Any] = yaml.safe_load(
        textwrap.dedent("""\
        batch: wave-2
        limits: {max_parallel: 3, max_per_host: 1}
        defaults: {output_dir: out, options: {network: mig}}
        vms:
          - id: web01
            disks: [/a.vmdk, {path: /b.vhdx}]
            options: {host_group: [kvm1, kvm2], priority: 3, dry_run: true}
          - id: db01
            target_format: raw
            disks: [/c.vdi]
            options: {host: kvm9, memory_mib: 8192, vcpus: 4, os: none}
        """)
    )
    check.validate(manifest)
    for bad in (
        {**manifest, "owner": "ops"},
        {**manifest, "batch": "a b"},
        {**manifest, "vms": []},
        {**manifest, "limits": {"max_parallel": 0}},
        {**manifest, "vms": [{"id": "x", "disks": [{"path": "/a", "bus": "scsi"}]}]},
        {**manifest, "vms": [{"id": "x", "disks": ["/a"], "options": {"os": "linux"}}]},
    ):
        assert not check.is_valid(bad), bad


def real_report(tmp_path: Path) -> dict[str, Any]:
    """A report as a finished migration writes it, read back from disk."""
    root = tmp_path.resolve()
    out = root / "wave-1"
    vm = {
        "id": "web01",
        "disks": [
            {
                "source": "/src/web01.vmdk",
                "format": "vmdk",
                "virtual_size": 20 * GIB,
                "target": f"{out}/web01-disk0.qcow2",
            }
        ],
        "target_format": "qcow2",
        "output_dir": str(out),
        "output_root": str(root),
        "dry_run": False,
    }
    now = time.time()
    root_os = OSInfo(root_partition=1, type="linux", distro="debian", major=12, hostname="web01")
    result = {
        "conversions": [
            {
                "target": f"{out}/web01-disk0.qcow2",
                "target_bytes": 3 * GIB,
                "seconds": 41.25,
                "source_identity": "size+mtime+inode:1:2:3",
                "source_unchanged": True,
            }
        ],
        "partitions": [{"number": 1, "start_sector": 2048, "size_sectors": 4096}],
        "filesystems": [{"partition": 1, "type": "ext4", "uuid": "u-1", "label": None}],
        "mounts": {"1": {"strategy": "normal", "ok": True}},
        "roots": [root_os.to_dict()],
        "fixes": [{"name": "fstab", "path": "/etc/fstab", "before": "sda1", "after": "UUID=u-1"}],
        "fix_notes": ["grub: nothing to change"],
        "guestcaps": GuestCaps.compatibility("no virtio_blk in the initramfs").to_dict(),
        "preparation": {
            "initramfs": {
                "outcome": "rebuilt",
                "ok": True,
                "dry_run": False,
                "generator": "initramfs-tools",
                "arch": "x86_64",
                "modules_policy": "most",
                "kernels": [
                    {
                        "kernel": "6.1.0-18-amd64",
                        "initrd": "/boot/initrd.img-6.1.0-18-amd64",
                        "generator": "initramfs-tools",
                        "action": "rebuilt",
                        "ok": True,
                        "modules_before": ["ahci"],
                        "modules_after": ["ahci", "virtio_blk", "virtio_pci"],
                        "virtio_blk_before": False,
                        "virtio_blk_after": True,
                        "builtin": False,
                        "backup": None,
                        "verified": True,
                        "seconds": 12.5,
                        "output_tail": "",
                        "reason": None,
                        "notes": [],
                    }
                ],
                "notes": [],
            }
        },
        "libvirt_xml": f"{out}/web01.xml",
    }
    record = JobRecord(
        job_id="wave-1.web01",
        status="done",
        host="kvm1",
        result=result,
        timestamps={"queued": now - 60, "converting": now - 50, "inspecting": now - 5, "done": now},
    )
    path = outputs.write_vm_report(vm, record, settings_roots=())
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def test_a_real_report_matches_the_model_and_the_schema(tmp_path: Path) -> None:
    data = real_report(tmp_path)
    report = VMReport.model_validate(data)
    assert report.status == "done" and report.disks[0].target_size == 3 * GIB
    assert report.initramfs is not None and report.initramfs.kernels[0].virtio_blk_after
    validator("report").validate(data)


def test_a_failed_vm_report_matches_too(tmp_path: Path) -> None:
    out = tmp_path.resolve() / "w"
    vm = {
        "id": "db01",
        "disks": [{"source": "/s.vmdk", "format": "vmdk", "target": f"{out}/db01-disk0.qcow2"}],
        "target_format": "qcow2",
        "output_dir": str(out),
        "output_root": str(tmp_path.resolve()),
    }
    record = JobRecord(job_id="w.db01", status="failed", error="convert failed: disk full")
    data = json.loads(Path(outputs.write_vm_report(vm, record, settings_roots=())).read_text())
    assert VMReport.model_validate(data).error == "convert failed: disk full"
    validator("report").validate(data)


def test_a_report_that_breaks_the_contract_is_not_written(tmp_path: Path) -> None:
    out = tmp_path.resolve() / "w"
    vm = {
        "id": "db01",
        "disks": [{"source": "/s.vmdk", "target": f"{out}/db01-disk0.qcow2"}],
        "target_format": "qcow2",
        "output_dir": str(out),
        "output_root": str(tmp_path.resolve()),
    }
    record = JobRecord(job_id="w.db01", status="lost-in-space")
    with pytest.raises(ValueError, match="status"):
        outputs.write_vm_report(vm, record, settings_roots=())
    assert not out.exists() or not list(out.iterdir())
