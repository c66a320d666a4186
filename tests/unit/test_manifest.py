import json
import os
import subprocess
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from scheduler.manifest import (
    BatchLimits,
    BatchPlan,
    DiskPlan,
    ManifestError,
    Problem,
    VMPlan,
    load_manifest,
    parse_manifest,
)
from vmcraft_tasks.craft.errors import (
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    UnsupportedImageError,
)
from vmcraft_tasks.craft.images import FORMAT_HINTS, ImageInfo

GIB = 1024**3


class FakeProbe:
    """Stands in for probe_image: every path is a 1 GiB image of the format its
    extension hints, except those listed as missing or failing. Records each call."""

    def __init__(
        self, *, missing: Iterable[str] = (), errors: Mapping[str, ImageError] | None = None
    ) -> None:
        self.missing = set(missing)
        self.errors = dict(errors or {})
        self.calls: list[str] = []

    def __call__(self, path: str) -> ImageInfo:
        self.calls.append(path)
        if path in self.missing:
            raise ImageNotFoundError(path, "no such file")
        if path in self.errors:
            raise self.errors[path]
        fmt = FORMAT_HINTS.get(os.path.splitext(path)[1], "raw")
        return ImageInfo(path=path, format=fmt, virtual_size=GIB, identity="fake")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    # Resolved, so the real paths the manifest keeps equal the ones the tests expect.
    return tmp_path.resolve()


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def parse(data: Mapping[str, Any], base: Path, **kwargs: Any) -> BatchPlan:
    kwargs.setdefault("probe", FakeProbe())
    return parse_manifest(data, base_dir=str(base), **kwargs)


def problems_of(data: Mapping[str, Any], base: Path, **kwargs: Any) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        parse(data, base, **kwargs)
    return info.value.problems


def lines_of(data: Mapping[str, Any], base: Path, **kwargs: Any) -> list[str]:
    return [str(p) for p in problems_of(data, base, **kwargs)]


def vm(vm_id: str = "web01", **fields: Any) -> dict[str, Any]:
    return {"id": vm_id, "disks": [f"/data/vmware/{vm_id}.vmdk"], **fields}


def batch(*vms: Any, **top: Any) -> dict[str, Any]:
    return {"batch": "wave-1", "vms": list(vms) or [vm()], **top}


# --- valid manifests --------------------------------------------------------------


def test_smallest_manifest_gets_every_default(base: Path) -> None:
    path = write(
        base / "wave-1.yaml",
        """\
        batch: wave-1
        vms:
          - id: web01
            disks: [/data/vmware/web01.vmdk]
        """,
    )
    probe = FakeProbe()
    plan = load_manifest(path, probe=probe)
    assert plan == BatchPlan(
        batch="wave-1",
        manifest_path=path,
        limits=BatchLimits(max_parallel=None, max_per_host=None),
        vms=(
            VMPlan(
                id="web01",
                disks=(
                    DiskPlan(
                        source="/data/vmware/web01.vmdk",
                        format="vmdk",
                        virtual_size=GIB,
                        target=f"{base}/wave-1/web01-disk0.qcow2",
                    ),
                ),
                target_format="qcow2",
                output_dir=f"{base}/wave-1",
                fixes=True,
                dry_run=False,
                host=None,
                host_group=None,
                priority=0,
                memory_mib=2048,
                vcpus=2,
                network="default",
                output_root=str(base),
            ),
        ),
        summary_dir=f"{base}/wave-1",
        summary_root=str(base),
    )
    assert probe.calls == ["/data/vmware/web01.vmdk"]


def test_json_manifest_by_extension(base: Path) -> None:
    path = base / "wave.json"
    path.write_text(json.dumps(batch(limits={"max_parallel": 4, "max_per_host": 2})))
    plan = load_manifest(str(path), probe=FakeProbe())
    assert plan.limits == BatchLimits(max_parallel=4, max_per_host=2)
    assert [v.id for v in plan.vms] == ["web01"]


def test_format_detected_by_content_without_a_known_extension(base: Path) -> None:
    as_json = base / "wave-json.manifest"
    as_json.write_text(json.dumps(batch()))
    as_yaml = write(
        base / "wave-yaml.manifest", "batch: wave-1\nvms: [{id: web01, disks: [/x.vmdk]}]\n"
    )
    assert load_manifest(str(as_json), probe=FakeProbe()).vms[0].id == "web01"
    assert load_manifest(as_yaml, probe=FakeProbe()).vms[0].disks[0].source == "/x.vmdk"


def test_defaults_apply_unless_the_vm_sets_them(base: Path) -> None:
    plan = parse(
        batch(
            vm("web01"),
            vm(
                "db01",
                target_format="qcow2",
                output_dir="/srv/db",
                options={"vcpus": 8, "dry_run": False},
            ),
            defaults={
                "target_format": "raw",
                "output_dir": "out",
                "options": {"vcpus": 4, "dry_run": True, "fixes": False, "network": "mig"},
            },
        ),
        base,
        output_roots=[str(base), "/srv"],
    )
    web, db = plan.vms
    assert (web.target_format, web.output_dir, web.vcpus, web.dry_run) == (
        "raw",
        f"{base}/out",
        4,
        True,
    )
    assert web.disks[0].target == f"{base}/out/web01-disk0.raw"
    # Options merge key by key: db01 keeps the default fixes and network.
    assert (db.target_format, db.output_dir, db.vcpus, db.dry_run) == ("qcow2", "/srv/db", 8, False)
    assert (db.fixes, db.network, db.memory_mib) == (False, "mig", 2048)
    assert db.disks[0].target == "/srv/db/db01-disk0.qcow2"


def test_vm_placement_replaces_the_default_placement(base: Path) -> None:
    plan = parse(
        batch(
            vm("web01"),
            vm("web02", options={"host": "kvm3"}),
            vm("web03", options={"host_group": None}),
            defaults={"options": {"host_group": ["kvm1", "kvm2"]}},
        ),
        base,
    )
    placement = [(v.host, v.host_group) for v in plan.vms]
    assert placement == [(None, ("kvm1", "kvm2")), ("kvm3", None), (None, None)]


def test_disks_as_mappings_and_relative_paths(base: Path) -> None:
    (base / "img").mkdir()
    plan = parse(batch(vm("web01", disks=[{"path": "img/a.vmdk"}, "img/b.vhdx"])), base)
    disks = plan.vms[0].disks
    assert [d.source for d in disks] == [f"{base}/img/a.vmdk", f"{base}/img/b.vhdx"]
    assert [d.format for d in disks] == ["vmdk", "vhdx"]
    assert [os.path.basename(d.target) for d in disks] == ["web01-disk0.qcow2", "web01-disk1.qcow2"]


def test_vms_by_priority_is_stable(base: Path) -> None:
    plan = parse(
        batch(
            vm("a"),
            vm("b", options={"priority": 5}),
            vm("c", options={"priority": -1}),
            vm("d", options={"priority": 5}),
            vm("e"),
        ),
        base,
    )
    assert [v.id for v in plan.vms_by_priority()] == ["b", "d", "a", "e", "c"]
    assert [v.id for v in plan.vms] == ["a", "b", "c", "d", "e"]


def test_check_files_off_never_probes(base: Path) -> None:
    probe = FakeProbe()
    plan = parse(
        batch(vm("web01", disks=["/d/a.vhd", "/d/b.bin"])), base, probe=probe, check_files=False
    )
    assert probe.calls == []
    assert [(d.format, d.virtual_size) for d in plan.vms[0].disks] == [("vpc", 0), ("raw", 0)]


def test_image_roots_allow_disks_inside(base: Path) -> None:
    root = base / "images"
    root.mkdir()
    plan = parse(
        batch(vm("web01", disks=[str(root / "web01.vmdk")])), base, image_roots=[str(root)]
    )
    assert plan.vms[0].disks[0].source == f"{root}/web01.vmdk"


def test_round_trip_through_json(base: Path) -> None:
    plan = load_manifest(
        write(
            base / "m.yaml",
            """\
            batch: wave-2
            limits: {max_parallel: 3}
            vms:
              - id: web01
                disks: [/a.vmdk, {path: /b.vhdx}]
                options: {host_group: [kvm1, kvm2], priority: 3, dry_run: true}
              - id: db01
                target_format: raw
                disks: [/c.vdi]
                options: {host: kvm9, memory_mib: 8192, vcpus: 4, network: mig}
            """,
        ),
        probe=FakeProbe(),
    )
    data = json.loads(json.dumps(plan.to_dict()))
    assert BatchPlan.from_dict(data) == plan
    assert VMPlan.from_dict(data["vms"][0]) == plan.vms[0]
    assert DiskPlan.from_dict(data["vms"][1]["disks"][0]) == plan.vms[1].disks[0]
    assert BatchLimits.from_dict(data["limits"]) == plan.limits
    problem = Problem("db01", "vms[1].disks[0]", "/c.vdi: no such file")
    assert Problem.from_dict(json.loads(json.dumps(problem.to_dict()))) == problem


# --- problems ---------------------------------------------------------------------


def test_several_problems_reported_at_once_with_vm_ids(base: Path) -> None:
    probe = FakeProbe(missing={"/data/x.vmdk"})
    data = batch(
        vm("web01"),
        vm("web02", options={"vcpus": 0}),
        vm("db02", disks=["/data/x.vmdk"]),
        vm("web01"),
    )
    with pytest.raises(ManifestError) as info:
        parse(data, base, probe=probe)
    assert str(info.value).splitlines() == [
        "vms[1] (web02).options.vcpus: must be at least 1, got 0",
        "vms[2] (db02).disks[0]: /data/x.vmdk: no such file",
        "vms[3] (web01).id: duplicate id 'web01' (first used by vms[0])",
    ]
    assert [(p.vm, p.field) for p in info.value.problems] == [
        ("web02", "vms[1].options.vcpus"),
        ("db02", "vms[2].disks[0]"),
        ("web01", "vms[3].id"),
    ]


def test_unknown_keys_at_every_level_name_the_allowed_ones(base: Path) -> None:
    data = batch(
        vm(
            "web01",
            disks=[{"path": "/a.vmdk", "bus": "scsi"}],
            colour="red",
            options={"cpus": 4},
        ),
        limits={"max_paralel": 2},
        defaults={"id": "x"},
        owner="ops",
    )
    assert sorted(lines_of(data, base)) == sorted(
        [
            "owner: unknown key 'owner' (allowed: batch, defaults, limits, vms)",
            "limits.max_paralel: unknown key 'max_paralel' (allowed: max_parallel, max_per_host)",
            "defaults.id: unknown key 'id' (allowed: target_format, output_dir, options)",
            "vms[0] (web01).colour: unknown key 'colour' "
            "(allowed: id, disks, target_format, output_dir, options)",
            "vms[0] (web01).options.cpus: unknown key 'cpus' (allowed: os, fixes, dry_run, "
            "boot_check, host, host_group, priority, memory_mib, vcpus, network)",
            "vms[0] (web01).disks[0].bus: unknown key 'bus' (allowed: path)",
        ]
    )


def test_option_keys_at_vm_level_point_to_options(base: Path) -> None:
    [line] = lines_of(batch(vm("web01", priority=3)), base)
    assert line.endswith("; priority belongs under options")


def test_wrong_types(base: Path) -> None:
    data = {
        "batch": 7,
        "limits": [],
        "vms": [
            {"id": "web01", "disks": "/a.vmdk", "options": {"fixes": "yes", "host": False}},
            {"id": "web02", "disks": [3], "options": {"memory_mib": "2G", "host_group": "kvm1"}},
            {"id": "web03", "disks": ["/b.vmdk"], "options": {"vcpus": True, "network": ""}},
            "web04",
        ],
    }
    assert lines_of(data, base) == [
        "batch: expected a string, got number 7 (quote it)",
        "limits: expected a mapping, got a list",
        "vms[0] (web01).options.fixes: expected true or false, got string 'yes'",
        "vms[0] (web01).options.host: expected a string, got boolean False (quote it)",
        "vms[0] (web01).disks: expected a list of disks, got string '/a.vmdk'",
        "vms[1] (web02).options.memory_mib: expected an integer, got string '2G'",
        "vms[1] (web02).options.host_group: expected a list of host ids, got string 'kvm1'",
        "vms[1] (web02).disks[0]: expected a path or a mapping with path, got number 3",
        "vms[2] (web03).options.vcpus: expected an integer, got boolean True",
        "vms[2] (web03).options.network: must not be empty",
        "vms[3]: expected a mapping with id and disks, got string 'web04'",
    ]


def test_vm_without_a_usable_id_is_named_by_index_only(base: Path) -> None:
    data = batch({"disks": ["/a.vmdk"]}, {"id": 12, "disks": ["/b.vmdk"]})
    assert lines_of(data, base) == [
        "vms[0].id: required",
        "vms[1].id: expected a string, got number 12 (quote it)",
    ]


@pytest.mark.parametrize("bad", ["web 01", "db/01", "", "x" * 65, "..", "ünï"])
def test_invalid_ids(base: Path, bad: str) -> None:
    problems = problems_of({"batch": bad, "vms": [vm(bad)]}, base)
    assert [p.field for p in problems] == ["batch", "vms[0].id"]


def test_ids_at_the_charset_limits_are_fine(base: Path) -> None:
    long_id = "A-z_0.9" + "x" * 57
    plan = parse({"batch": long_id, "vms": [vm(long_id)]}, base)
    assert plan.batch == plan.vms[0].id == long_id


def test_missing_required_and_empty_lists(base: Path) -> None:
    assert lines_of({"vms": [vm("web01", disks=[])]}, base) == [
        "batch: required",
        "vms[0] (web01).disks: must list at least one disk",
    ]
    assert lines_of({"batch": "b", "vms": [{"id": "web01"}]}, base) == [
        "vms[0] (web01).disks: required"
    ]
    assert lines_of({"batch": "b", "vms": []}, base) == ["vms: must list at least one VM"]
    assert lines_of({"batch": "b"}, base) == ["vms: required: list the VMs of the batch"]
    assert lines_of(batch(vm("web01", disks=[{}])), base) == [
        "vms[0] (web01).disks[0].path: required"
    ]


def test_duplicate_ids_are_found_even_in_faulty_vms(base: Path) -> None:
    data = batch(vm("db01", disks=[]), vm("db01", disks=[]), vm("db01"))
    assert lines_of(data, base) == [
        "vms[0] (db01).disks: must list at least one disk",
        "vms[1] (db01).disks: must list at least one disk",
        "vms[1] (db01).id: duplicate id 'db01' (first used by vms[0])",
        "vms[2] (db01).id: duplicate id 'db01' (first used by vms[0])",
    ]


def test_missing_disk_files(base: Path) -> None:
    probe = FakeProbe(missing={"/data/a.vmdk", "/data/b.vmdk"})
    data = batch(vm("web01", disks=["/data/a.vmdk", "/data/ok.vmdk", "/data/b.vmdk"]))
    assert lines_of(data, base, probe=probe) == [
        "vms[0] (web01).disks[0]: /data/a.vmdk: no such file",
        "vms[0] (web01).disks[2]: /data/b.vmdk: no such file",
    ]


def test_same_disk_twice_in_one_vm(base: Path) -> None:
    data = batch(vm("web01", disks=["/d/a.vmdk", "/d/../d/a.vmdk"]))
    assert lines_of(data, base) == ["vms[0] (web01).disks[1]: /d/a.vmdk: same disk as disks[0]"]


@pytest.mark.parametrize(
    "error",
    [
        UnsupportedImageError("/d/a.vmdk", "unsupported image format: Unknown driver 'x'"),
        CorruptImageError("/d/a.vmdk", "not a readable disk image: invalid VMDK descriptor"),
        ImageError("/d/a.vmdk", "not readable"),
    ],
)
def test_probe_errors_become_problems(base: Path, error: ImageError) -> None:
    probe = FakeProbe(errors={"/d/a.vmdk": error})
    problems = problems_of(batch(vm("web01", disks=["/d/a.vmdk"])), base, probe=probe)
    assert problems == [Problem("web01", "vms[0].disks[0]", str(error))]


def test_disks_outside_the_roots_are_refused_without_probing(base: Path) -> None:
    root = base / "images"
    root.mkdir()
    (base / "secret.raw").write_bytes(b"\0" * 512)
    (root / "link.raw").symlink_to(base / "secret.raw")
    probe = FakeProbe()
    data = batch(vm("web01", disks=["/etc/shadow", str(root / "link.raw"), "images/../x.raw"]))
    lines = lines_of(data, base, probe=probe, image_roots=[str(root)])
    assert lines == [
        f"vms[0] (web01).disks[0]: /etc/shadow: outside the allowed image roots ({root})",
        f"vms[0] (web01).disks[1]: {root}/link.raw (resolves to {base}/secret.raw): "
        f"outside the allowed image roots ({root})",
        f"vms[0] (web01).disks[2]: images/../x.raw: outside the allowed image roots ({root})",
    ]
    assert probe.calls == []


def test_roots_are_checked_even_without_file_checks(base: Path) -> None:
    data = batch(vm("web01", disks=["/etc/shadow"]))
    problems = problems_of(data, base, check_files=False, image_roots=[str(base)])
    assert [p.field for p in problems] == ["vms[0].disks[0]"]


def test_unsupported_target_format(base: Path) -> None:
    data = batch(vm("web01", target_format="vmdk"), defaults={"target_format": "vhdx"})
    assert lines_of(data, base) == [
        "defaults.target_format: unsupported target format 'vhdx' (supported: qcow2, raw)",
        "vms[0] (web01).target_format: unsupported target format 'vmdk' (supported: qcow2, raw)",
    ]


def test_host_and_host_group_together(base: Path) -> None:
    data = batch(vm("web01", options={"host": "kvm1", "host_group": ["kvm1", "kvm2"]}))
    assert lines_of(data, base) == [
        "vms[0] (web01).options: host and host_group are mutually exclusive: "
        "pin to one or the other"
    ]


def test_empty_host_group(base: Path) -> None:
    data = batch(vm("web01", options={"host_group": []}))
    assert [p.field for p in problems_of(data, base)] == ["vms[0].options.host_group"]


def test_zero_and_negative_numbers(base: Path) -> None:
    data = batch(
        vm("web01", options={"memory_mib": 0, "vcpus": -2}),
        limits={"max_parallel": 0, "max_per_host": -1},
        defaults={"options": {"memory_mib": -512}},
    )
    assert lines_of(data, base) == [
        "limits.max_parallel: must be at least 1, got 0",
        "limits.max_per_host: must be at least 1, got -1",
        "defaults.options.memory_mib: must be at least 1, got -512",
        "vms[0] (web01).options.memory_mib: must be at least 1, got 0",
        "vms[0] (web01).options.vcpus: must be at least 1, got -2",
    ]


def test_target_that_would_overwrite_a_source(base: Path) -> None:
    data = batch(
        vm("web01", disks=[f"{base}/out/web01-disk0.qcow2"], output_dir="out"),
    )
    [problem] = problems_of(data, base)
    assert problem.field == "vms[0].disks[0]"
    assert "would overwrite a source disk" in problem.message


def test_yaml_syntax_error_names_the_line(base: Path) -> None:
    path = write(
        base / "m.yaml",
        """\
        batch: wave-1
        vms:
          - id: web01
            disks: [/a.vmdk]
          - id: web02: db
            disks: [/b.vmdk]
        """,
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path, probe=FakeProbe())
    [problem] = info.value.problems
    assert (problem.vm, problem.field) == (None, "")
    assert str(info.value) == (
        f"{path}: invalid YAML at line 5, column 14: mapping values are not allowed here"
    )


def test_json_syntax_error_names_the_line(base: Path) -> None:
    path = write(base / "m.json", '{\n  "batch": "wave-1",\n  "vms": [,]\n}\n')
    with pytest.raises(ManifestError, match=r"m\.json: invalid JSON at line 3, column 11"):
        load_manifest(path, probe=FakeProbe())


def test_duplicate_keys_are_refused(base: Path) -> None:
    path = write(
        base / "m.yaml",
        """\
        batch: wave-1
        vms:
          - {id: web01, disks: [/a.vmdk]}
        vms:
          - {id: web02, disks: [/b.vmdk]}
        """,
    )
    with pytest.raises(ManifestError, match="line 4, column 1: found duplicate key 'vms'"):
        load_manifest(path, probe=FakeProbe())
    json_path = write(base / "m.json", '{"batch": "a", "batch": "b", "vms": []}')
    with pytest.raises(ManifestError, match="duplicate key 'batch'"):
        load_manifest(json_path, probe=FakeProbe())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- web01\n- web02\n", "the manifest must be a mapping with batch and vms, got a list"),
        (
            "just text\n",
            "the manifest must be a mapping with batch and vms, got string 'just text'",
        ),
        ("", "the manifest is empty"),
    ],
)
def test_a_file_that_is_not_a_mapping(base: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(base / "m.yaml", text), probe=FakeProbe())
    assert str(info.value) == message


def test_parse_manifest_refuses_a_non_mapping(base: Path) -> None:
    with pytest.raises(ManifestError, match="got a list"):
        parse_manifest([], base_dir=str(base), probe=FakeProbe())  # type: ignore[arg-type]


def test_unreadable_manifest(base: Path) -> None:
    with pytest.raises(ManifestError, match=r"absent\.yaml: cannot read: No such file"):
        load_manifest(str(base / "absent.yaml"))


# --- the real probe ---------------------------------------------------------------


def test_real_probe_accepts_a_real_qcow2(base: Path) -> None:
    image = base / "web01.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True, timeout=30
    )
    path = write(base / "m.yaml", "batch: wave-1\nvms:\n  - {id: web01, disks: [web01.qcow2]}\n")
    plan = load_manifest(path, image_roots=[str(base)])
    [disk] = plan.vms[0].disks
    assert (disk.source, disk.format, disk.virtual_size) == (str(image), "qcow2", 16 * 1024**2)


def test_real_probe_refuses_a_text_file_named_vmdk(base: Path) -> None:
    (base / "x.vmdk").write_text("this is not a disk image\n")
    path = write(base / "m.yaml", "batch: wave-1\nvms:\n  - {id: db02, disks: [x.vmdk]}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    [problem] = info.value.problems
    assert (problem.vm, problem.field) == ("db02", "vms[0].disks[0]")
    assert problem.message.startswith(f"{base}/x.vmdk: ")
    assert "unsupported" in problem.message or "not a readable disk image" in problem.message


def test_os_none_declares_a_data_only_vm_and_other_values_are_refused(base: Path) -> None:
    plan = parse(batch(vm(options={"os": "none"})), base)
    assert plan.vms[0].os == "none"
    assert VMPlan.from_dict(plan.vms[0].to_dict()).os == "none"
    assert parse(batch(vm()), base).vms[0].os == "auto"
    assert lines_of(batch(vm(options={"os": "linux"})), base) == [
        "vms[0] (web01).options.os: must be one of auto, none (none: a data-only VM), not 'linux'"
    ]


# --- output folders, reserved ids, the summary's place -----------------------------


def test_output_dir_outside_the_manifests_folder_is_refused_by_default(base: Path) -> None:
    lines = lines_of(batch(vm("web01", output_dir="/etc")), base)
    assert lines == [
        f"vms[0] (web01).output_dir: /etc: outside the output roots ({base})",
    ]


@pytest.mark.parametrize(
    ("folder", "reason"),
    [
        ("/etc", "inside /etc, a system folder"),
        ("/etc/cron.d", "inside /etc, a system folder"),
        ("/usr/local/out", "inside /usr, a system folder"),
        ("/lib64/x", "inside /lib64, a system folder"),
        ("/var/log/x", "inside /var, a system folder"),
        ("/", "/ is a system folder: use a folder below it"),
        ("/home", "/home is a system folder: use a folder below it"),
        ("/proc/self", "inside /proc, a system folder"),
    ],
)
def test_system_folders_are_refused_even_under_a_root(base: Path, folder: str, reason: str) -> None:
    lines = lines_of(batch(vm("web01", output_dir=folder)), base, output_roots=["/"])
    assert lines == [f"vms[0] (web01).output_dir: {folder}: {reason}"]


@pytest.mark.parametrize("folder", ["/var/tmp/out", "/var/lib/vmcraft/wave-1", "/home/ops/out"])
def test_data_folders_are_fine(base: Path, folder: str) -> None:
    plan = parse(batch(vm("web01", output_dir=folder)), base, output_roots=["/"])
    assert plan.vms[0].output_dir == folder
    assert plan.vms[0].output_root == "/"


def test_output_dir_through_a_symlink_out_of_the_root_is_refused(base: Path) -> None:
    outside = base.parent / f"{base.name}-outside"
    outside.mkdir()
    (base / "out").symlink_to(outside)
    lines = lines_of(batch(vm("web01", output_dir="out/wave")), base)
    assert lines == [
        f"vms[0] (web01).output_dir: {base}/out/wave: {base}/out is a symlink (to {outside}); "
        "output folders must be reached without symlinks"
    ]


def test_a_symlink_inside_the_root_is_refused_too(base: Path) -> None:
    (base / "real").mkdir()
    (base / "alias").symlink_to(base / "real")
    (problem,) = problems_of(batch(vm("web01", output_dir="alias")), base)
    assert problem.field == "vms[0].output_dir" and "is a symlink" in problem.message


def test_climbing_out_with_dotdot_is_outside(base: Path) -> None:
    (problem,) = problems_of(batch(vm("web01", output_dir="../elsewhere")), base)
    assert "outside the output roots" in problem.message


def test_a_bad_default_output_dir_is_reported_once(base: Path) -> None:
    data = batch(vm("a"), vm("b"), vm("c"), defaults={"output_dir": "/etc/vmcraft"})
    assert lines_of(data, base) == [
        f"defaults.output_dir: /etc/vmcraft: outside the output roots ({base})"
    ]


def test_output_roots_move_the_default_folder_under_the_first_root(base: Path) -> None:
    root = base / "exports"
    plan = parse(batch(vm("web01")), base / "manifests", output_roots=[str(root)])
    assert plan.vms[0].output_dir == f"{root}/wave-1"
    assert plan.vms[0].output_root == str(root)
    assert plan.vms[0].disks[0].target == f"{root}/wave-1/web01-disk0.qcow2"


def test_output_dir_is_kept_symlink_free_when_the_root_is_a_symlink(base: Path) -> None:
    real = base / "storage"
    real.mkdir()
    (base / "link-root").symlink_to(real)
    plan = parse(
        batch(vm("web01", output_dir=f"{base}/link-root/out")),
        base,
        output_roots=[str(base / "link-root")],
    )
    # The root itself is trusted configuration; what is kept is the resolved path.
    assert plan.vms[0].output_dir == f"{real}/out"
    assert plan.vms[0].output_root == str(real)


@pytest.mark.parametrize(
    "bad",
    [
        "summary",
        "Summary",
        ".hidden",
        "web01-disk0.qcow2.vmcraft",
        "web01-disk0.qcow2",
        "x-disk3.raw",
        "a.json",
        "a.xml",
        "a.md",
        "a.tmp",
        "a.part-1",
    ],
)
def test_reserved_vm_ids_are_refused_with_a_reason(base: Path, bad: str) -> None:
    (problem,) = problems_of(batch(vm("web01"), vm(bad)), base)
    assert problem.field == "vms[1].id"
    assert problem.message.startswith("reserved id: ")
    assert repr(bad) in problem.message


def test_vms_in_two_folders_get_one_summary_folder(base: Path) -> None:
    plan = parse(batch(vm("a", output_dir="one"), vm("b", output_dir="two")), base)
    assert (plan.summary_dir, plan.summary_root) == (f"{base}/wave-1", str(base))


def test_vms_sharing_a_folder_get_the_summary_there(base: Path) -> None:
    plan = parse(batch(vm("a"), vm("b"), defaults={"output_dir": "out"}), base)
    assert plan.summary_dir == f"{base}/out"


def test_output_root_and_summary_survive_the_json_round_trip(base: Path) -> None:
    plan = parse(batch(vm("a", output_dir="one"), vm("b")), base)
    assert BatchPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_load_manifest_passes_output_roots(base: Path) -> None:
    path = write(
        base / "m.yaml", "batch: b\nvms: [{id: a, disks: [/x.vmdk], output_dir: /srv/x}]\n"
    )
    with pytest.raises(ManifestError, match="outside the output roots"):
        load_manifest(path, probe=FakeProbe())
    plan = load_manifest(path, probe=FakeProbe(), output_roots=["/srv"])
    assert plan.vms[0].output_dir == "/srv/x"


def test_boot_check_is_off_unless_asked_per_vm_or_in_defaults(base: Path) -> None:
    plan = parse(
        batch(
            vm("web01"),
            vm("db01", options={"boot_check": False}),
            defaults={"options": {"boot_check": True}},
        ),
        base,
    )
    web, db = plan.vms
    assert (web.boot_check, db.boot_check) == (True, False)
    assert web.step_options() == {"boot_check": True}
    assert parse(batch(vm("web01")), base).vms[0].boot_check is False
    (problem,) = problems_of(batch(vm("web01", options={"boot_check": "yes"})), base)
    assert "boot_check" in str(problem)
