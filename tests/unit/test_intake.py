from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.intake import is_vm_image_problem, load_for_run
from scheduler.manifest import ManifestError, Problem


def _manifest(tmp_path: Path, vms: list[dict[str, Any]]) -> str:
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"batch": "b1", "vms": vms}))
    return str(path)


def test_a_missing_disk_fails_only_its_vm(tmp_path):
    good = tmp_path / "good.raw"
    good.write_bytes(b"\0" * 1024 * 1024)
    path = _manifest(
        tmp_path,
        [{"id": "ok", "disks": [str(good)]}, {"id": "gone", "disks": [str(tmp_path / "x.vmdk")]}],
    )
    plan, failed = load_for_run(path)
    assert [vm.id for vm in plan.vms] == ["ok", "gone"]
    assert set(failed) == {"gone"} and "no such file" in failed["gone"]
    with pytest.raises(ManifestError):
        load_for_run(path, strict=True)


def test_structural_problems_and_root_breaches_refuse_the_batch(tmp_path):
    good = tmp_path / "good.raw"
    good.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(ManifestError, match="outside"):
        load_for_run(
            _manifest(tmp_path, [{"id": "a", "disks": [str(good)]}]), image_roots=["/data"]
        )
    with pytest.raises(ManifestError):
        load_for_run(_manifest(tmp_path, [{"id": "a", "disks": [str(good)], "colour": "red"}]))


def test_problem_classification():
    assert is_vm_image_problem(Problem("v", "vms[0].disks[0]", "/x.vmdk: no such file"))
    assert not is_vm_image_problem(
        Problem("v", "vms[0].disks[0]", "/x: outside the allowed image roots")
    )
    assert not is_vm_image_problem(Problem("v", "vms[0].id", "duplicate id"))
    assert not is_vm_image_problem(Problem(None, "", "invalid YAML at line 3"))
