"""Output folders are confined and never clobbered: the attacks of issue 9, for real.

Real manifests read by the real loader, real images converted by the real qemu-img,
real symlinks planted where root would have written through them. A folder `etc` outside
the output root stands in for /etc: nothing may ever appear in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.manifest import ManifestError, load_manifest
from vmcraft_tasks import conversions, outputs
from vmcraft_tasks.craft.convert import TEMP_INFIX, convert_image
from vmcraft_tasks.craft.images import disk_identity
from vmcraft_tasks.jobs import JobRecord
from vmcraft_tasks.outfiles import ForeignFileError, OutputNameError, OutputPathError
from vmcraft_tasks.samples.toolkit import sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The manifest's folder: the default (and here only) output root."""
    path = tmp_path.resolve() / "site"
    path.mkdir()
    return path


@pytest.fixture
def fake_etc(tmp_path: Path) -> Path:
    path = tmp_path.resolve() / "etc"
    path.mkdir()
    (path / "shadow").write_text("root:$6$secret:19000:0:99999:7:::\n")
    return path


@pytest.fixture
def source(image_copy: Any, linux_gpt_raw: Any) -> str:
    """A real disk image the operator keeps private (0600)."""
    path: str = image_copy(linux_gpt_raw)
    os.chmod(path, 0o600)
    return path


def manifest(site: Path, vms: list[dict[str, Any]], batch: str = "wave-1") -> str:
    path = site / "wave.yaml"
    path.write_text(yaml.safe_dump({"batch": batch, "vms": vms}))
    return str(path)


def plan_of(site: Path, vms: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """The batch plan exactly as the scheduler stores it in Redis."""
    plan = load_manifest(manifest(site, vms), check_files=False, **kwargs)
    data: dict[str, Any] = json.loads(json.dumps(plan.to_dict()))
    return data


def convert_disk(vm: Mapping[str, Any], index: int = 0) -> conversions.ConversionMarker:
    """What the convert step does for one disk, with the real qemu-img."""
    disk = vm["disks"][index]
    roots = outputs.vm_output_roots(vm, settings_roots=())
    return conversions.convert_confined(
        disk["source"],
        disk["target"],
        roots,
        lambda staged: convert_image(
            disk["source"], staged, target_format=vm["target_format"], overwrite=False
        ).to_dict(),
    )


def done_record(vm_id: str) -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=f"wave-1.{vm_id}",
        status="done",
        timestamps={"converting": now - 2, "done": now},
    )


def visible(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if not p.startswith("."))


def mode(path: Path | str) -> int:
    return os.stat(path).st_mode & 0o777


# --- a whole VM, confined -----------------------------------------------------------


def test_a_vm_converted_and_reported_inside_its_folder_with_the_sources_permissions(
    site: Path, source: str
) -> None:
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    (vm,) = plan["vms"]
    assert outputs.check_vm_outputs(vm, settings_roots=()) == f"{site}/wave-1"
    before = sha256_file(source)

    marker = convert_disk(vm)
    target = Path(vm["disks"][0]["target"])
    assert marker.conversion["target"] == str(target)
    assert sha256_file(source) == before
    # A 0600 source gives a 0600 disk; the folder the tool made is 0750.
    assert mode(target) == 0o600
    assert mode(site / "wave-1") == 0o750
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(target)],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert not [p for p in os.listdir(target.parent) if TEMP_INFIX in p or p.endswith(".tmp")]
    # A resume finds it, and keeps it.
    roots = outputs.vm_output_roots(vm, settings_roots=())
    assert conversions.already_converted(source, str(target), roots) == marker

    report: dict[str, Any] = {"roots": [], "partitions": [], "guestcaps": None}
    xml = outputs.write_domain_xml(vm, report, settings_roots=())
    json_report = outputs.write_vm_report(vm, done_record("web01"), settings_roots=())
    summary = outputs.write_batch_summary(
        plan, {"web01": done_record("web01")}, started_at=time.time() - 5, settings_roots=()
    )
    assert summary["reports_dir"] == f"{site}/wave-1"
    assert (mode(xml), mode(json_report), mode(site / "wave-1" / "summary.json")) == (
        0o640,
        0o640,
        0o640,
    )
    assert visible(site / "wave-1") == [
        "summary.json",
        "summary.md",
        "web01-disk0.qcow2",
        "web01-disk0.qcow2.vmcraft.json",
        "web01.json",
        "web01.xml",
    ]
    # `vmcraft-tasks report` writes everything again: the tool's own files are replaced.
    outputs.write_batch_summary(
        plan, {"web01": done_record("web01")}, started_at=time.time() - 5, settings_roots=()
    )


# --- output_dir: /etc, and a symlink to it -----------------------------------------


def test_output_dir_etc_is_refused_by_the_manifest(site: Path, source: str) -> None:
    with pytest.raises(ManifestError, match=r"output_dir: /etc: outside the output roots"):
        load_manifest(manifest(site, [{"id": "web01", "disks": [source], "output_dir": "/etc"}]))
    with pytest.raises(ManifestError, match=r"output_dir: /etc: inside /etc, a system folder"):
        load_manifest(
            manifest(site, [{"id": "web01", "disks": [source], "output_dir": "/etc"}]),
            output_roots=["/"],
        )


def test_a_symlink_to_etc_is_refused_by_the_manifest(
    site: Path, source: str, fake_etc: Path
) -> None:
    (site / "out").symlink_to(fake_etc)
    with pytest.raises(ManifestError, match="out is a symlink"):
        load_manifest(manifest(site, [{"id": "web01", "disks": [source], "output_dir": "out"}]))
    assert os.listdir(fake_etc) == ["shadow"]


def test_a_folder_swapped_for_a_symlink_after_submit_is_refused_by_the_worker(
    site: Path, source: str, fake_etc: Path
) -> None:
    plan = plan_of(site, [{"id": "web01", "disks": [source], "output_dir": "out"}])
    (vm,) = plan["vms"]
    (site / "out").symlink_to(fake_etc)  # after the client checked it
    with pytest.raises(OutputPathError, match="is a symlink"):
        outputs.check_vm_outputs(vm, settings_roots=())
    with pytest.raises(OutputPathError, match="is a symlink"):
        convert_disk(vm)
    with pytest.raises(OutputPathError, match="is a symlink"):
        outputs.write_domain_xml(vm, {"roots": []}, settings_roots=())
    with pytest.raises(OutputPathError, match="is a symlink"):
        outputs.write_vm_report(vm, done_record("web01"), settings_roots=())
    with pytest.raises(OutputPathError, match="is a symlink"):
        outputs.write_batch_summary(plan, {"web01": done_record("web01")}, started_at=0.0)
    assert os.listdir(fake_etc) == ["shadow"]


def test_the_hosts_own_output_roots_override_the_plans(
    site: Path, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    (vm,) = plan["vms"]
    monkeypatch.setenv("VMCRAFT_OUTPUT_ROOTS", str(tmp_path / "exports"))
    with pytest.raises(OutputPathError, match="outside the output roots"):
        outputs.write_vm_report(vm, done_record("web01"))  # roots read from the environment
    assert not (site / "wave-1").exists()


def test_a_plan_naming_another_file_as_its_disk_is_refused(site: Path, source: str) -> None:
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    (vm,) = plan["vms"]
    vm["disks"][0]["target"] = f"{site}/wave-1/db01.json"
    with pytest.raises(OutputPathError, match=r"is not .*web01-disk0\.qcow2"):
        outputs.check_vm_outputs(vm, settings_roots=())


# --- never clobbered ----------------------------------------------------------------


def test_a_planted_file_at_the_disk_target_is_never_replaced(site: Path, source: str) -> None:
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    (vm,) = plan["vms"]
    target = Path(vm["disks"][0]["target"])
    target.parent.mkdir()
    target.write_bytes(b"a disk the tool did not make")
    with pytest.raises(ForeignFileError) as info:
        convert_disk(vm)
    assert str(target) in str(info.value) and "not made by vmcraft-tasks" in str(info.value)
    assert target.read_bytes() == b"a disk the tool did not make"
    assert visible(target.parent) == ["web01-disk0.qcow2"]


def test_a_planted_marker_for_a_planted_qcow2_with_a_host_data_file_is_refused(
    site: Path, source: str, tmp_path: Path
) -> None:
    """The attack: the planted qcow2 would be skipped, attached read-write, and its data
    file (a host file) edited. The marker does not count, in either format."""
    host_file = tmp_path / "host-data"
    host_file.write_bytes(b"host data " * 100_000)
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    (vm,) = plan["vms"]
    target = Path(vm["disks"][0]["target"])
    target.parent.mkdir()
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={host_file},data_file_raw=on",
            str(target),
            "1M",
        ],
        check=True,
        timeout=30,
    )
    host_sum = sha256_file(str(host_file))  # after qemu-img create, which sizes it
    st = target.stat()
    marker = target.parent / conversions.marker_name(str(target))
    roots = outputs.vm_output_roots(vm, settings_roots=())
    forged = [
        {"source_identity": disk_identity(source)},  # what main used to accept
        {
            "marker_version": 1,
            "source": source,
            "source_identity": disk_identity(source),
            "target": str(target),
            "target_identity": {
                "dev": st.st_dev,
                "ino": st.st_ino,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            },
            "checksum": "sha256:0",
            "conversion": {},
        },
    ]
    for planted in forged:
        marker.write_text(json.dumps(planted))
        with pytest.raises(ForeignFileError, match="not made by vmcraft-tasks"):
            conversions.already_converted(source, str(target), roots)
        with pytest.raises(ForeignFileError):
            convert_disk(vm)
    assert sha256_file(str(host_file)) == host_sum


def test_symlinks_at_the_marker_and_the_old_temp_names_are_not_written_through(
    site: Path, source: str, fake_etc: Path
) -> None:
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    (vm,) = plan["vms"]
    folder = site / "wave-1"
    folder.mkdir()
    shadow = fake_etc / "shadow"
    before = shadow.read_text()
    (folder / f"web01.xml.tmp-{os.getpid()}").symlink_to(shadow)
    (folder / f"web01.json.tmp-{os.getpid()}").symlink_to(shadow)
    outputs.write_domain_xml(vm, {"roots": []}, settings_roots=())
    outputs.write_vm_report(vm, done_record("web01"), settings_roots=())
    assert shadow.read_text() == before

    (folder / "web01-disk0.qcow2.vmcraft.json").symlink_to(shadow)
    roots = outputs.vm_output_roots(vm, settings_roots=())
    with pytest.raises(ForeignFileError, match="a symlink"):
        conversions.already_converted(source, vm["disks"][0]["target"], roots)
    with pytest.raises(ForeignFileError, match="a symlink"):
        convert_disk(vm)
    assert shadow.read_text() == before
    assert not (folder / "web01-disk0.qcow2").exists()


# --- one summary place --------------------------------------------------------------


def test_two_vms_in_two_folders_get_one_summary_place_never_a_common_parent(
    site: Path, source: str
) -> None:
    plan = plan_of(
        site,
        [
            {"id": "a", "disks": [source], "output_dir": "one"},
            {"id": "b", "disks": [source], "output_dir": "/" + str(site).strip("/") + "/two"},
        ],
    )
    records = {"a": done_record("a"), "b": done_record("b")}
    for vm in plan["vms"]:
        outputs.write_vm_report(vm, records[vm["id"]], settings_roots=())
    summary = outputs.write_batch_summary(plan, records, started_at=0.0, settings_roots=())
    assert summary["reports_dir"] == f"{site}/wave-1"
    assert visible(site / "wave-1") == ["a.json", "b.json", "summary.json", "summary.md"]
    assert visible(site / "one") == ["a.json"] and visible(site / "two") == ["b.json"]
    assert not (site / "summary.json").exists()
    assert not Path("/summary.json").exists() and not Path("/summary.md").exists()

    # A plan stored before the summary folder was recorded gets the same place.
    legacy = {k: v for k, v in plan.items() if k not in {"summary_dir", "summary_root"}}
    assert outputs.summary_location(legacy) == (f"{site}/wave-1", str(site))


# --- reserved names -----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["summary", "web01-disk0.qcow2.vmcraft"])
def test_reserved_ids_are_clear_errors_never_a_traceback(site: Path, source: str, bad: str) -> None:
    with pytest.raises(ManifestError, match=r"vms\[1\] \(.*\)\.id: reserved id"):
        load_manifest(
            manifest(site, [{"id": "web01", "disks": [source]}, {"id": bad, "disks": [source]}])
        )
    # A plan that reached Redis anyway (an older client): the worker refuses it in one line.
    plan = plan_of(site, [{"id": "web01", "disks": [source]}])
    vm = {**plan["vms"][0], "id": bad}
    attempts: list[Callable[[], object]] = [
        lambda: outputs.check_vm_outputs(vm, settings_roots=()),
        lambda: outputs.write_vm_report(vm, done_record(bad), settings_roots=()),
        lambda: outputs.write_domain_xml(vm, {"roots": []}, settings_roots=()),
    ]
    for attempt in attempts:
        with pytest.raises(OutputNameError) as info:
            attempt()
        assert "\n" not in str(info.value) and "VM id" in str(info.value)
    with pytest.raises(OutputNameError):
        outputs.write_batch_summary(
            {**plan, "vms": [vm]}, {bad: done_record(bad)}, started_at=0.0, settings_roots=()
        )
    assert not (site / "wave-1" / "summary.json").exists()
