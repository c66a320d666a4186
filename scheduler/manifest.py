"""The batch manifest: which VMs to migrate, from which disks, into what.

A manifest is read once, on the submitting side, and turned into a BatchPlan. The
plan (not the YAML) is what travels to workers, so everything that can be wrong with
a manifest is found here, before any VM of the batch starts, and every problem is
reported at once: fixing a 200-VM wave one error per run would take all day.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from vmcraft_tasks.craft.errors import ImageError
from vmcraft_tasks.craft.images import FORMAT_HINTS, SUPPORTED_FORMATS, ImageInfo, probe_image
from vmcraft_tasks.outfiles import (
    Confined,
    OutputPathError,
    confine,
    disk_file_name,
    vm_file_names,
    vm_id_problem,
    within,
)

Probe = Callable[[str], ImageInfo]

# Ids become file names, libvirt domain names and Redis keys: keep them to a charset
# that is safe in all three.
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TARGET_FORMATS = ("qcow2", "raw")

TOP_KEYS = ("batch", "defaults", "limits", "vms")
LIMIT_KEYS = ("max_parallel", "max_per_host")
VM_KEYS = ("id", "disks", "target_format", "output_dir", "options")
DEFAULT_KEYS = ("target_format", "output_dir", "options")
DISK_KEYS = ("path",)
OPTION_KEYS = (
    "os",
    "fixes",
    "dry_run",
    "host",
    "host_group",
    "priority",
    "memory_mib",
    "vcpus",
    "network",
)
# `os: none` declares a data-only VM (no operating system expected on its disks);
# `auto` (the default) requires one to be found.
OS_CHOICES = ("auto", "none")
VM_DEFAULTS: Mapping[str, Any] = {
    "target_format": "qcow2",
    "os": "auto",
    "fixes": True,
    "dry_run": False,
    "host": None,
    "host_group": None,
    "priority": 0,
    "memory_mib": 2048,
    "vcpus": 2,
    "network": "default",
}
_PLACEMENT = ("host", "host_group")
_VM_PREFIX = re.compile(r"vms\[\d+\]")


# --- problems ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest.

    `field` is the full location (`vms[2].disks[0]`, `limits.max_parallel`, or "" for
    the file as a whole); `vm` is the id of the VM it belongs to, when it has one.
    """

    vm: str | None
    field: str
    message: str

    def __str__(self) -> str:
        if not self.field:
            return self.message
        return f"{_label(self.field, self.vm)}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "field": self.field, "message": self.message}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        return cls(vm=data["vm"], field=data["field"], message=data["message"])


def _label(field: str, vm: str | None) -> str:
    # Index and id together: the index finds the entry, the id is what people recognise.
    match = _VM_PREFIX.match(field)
    if vm is None or match is None:
        return field
    return f"{field[: match.end()]} ({vm}){field[match.end() :]}"


class ManifestError(ValueError):
    """A manifest cannot be used; `problems` lists everything wrong with it."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class _Where:
    """Where in the manifest a value sits, for naming it in a Problem."""

    vm: str | None
    path: str

    def key(self, name: str) -> _Where:
        return _Where(self.vm, f"{self.path}.{name}" if self.path else name)

    def item(self, index: int) -> _Where:
        return _Where(self.vm, f"{self.path}[{index}]")

    def problem(self, message: str) -> Problem:
        return Problem(self.vm, self.path, message)


# --- the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLimits:
    max_parallel: int | None = None  # VMs of the batch in flight at once; None: no limit
    max_per_host: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_parallel": self.max_parallel, "max_per_host": self.max_per_host}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchLimits:
        return cls(max_parallel=data.get("max_parallel"), max_per_host=data.get("max_per_host"))


@dataclass(frozen=True)
class DiskPlan:
    source: str  # absolute and symlink-free: the file the roots check approved
    format: str
    virtual_size: int  # 0 when the manifest was read with check_files=False
    target: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiskPlan:
        return cls(
            source=data["source"],
            format=data["format"],
            virtual_size=int(data["virtual_size"]),
            target=data["target"],
        )


@dataclass(frozen=True)
class VMPlan:
    id: str
    disks: tuple[DiskPlan, ...]
    target_format: str
    output_dir: str
    os: str = "auto"
    fixes: bool = True
    dry_run: bool = False
    host: str | None = None
    host_group: tuple[str, ...] | None = None
    priority: int = 0
    memory_mib: int = 2048
    vcpus: int = 2
    network: str = "default"
    # The output root (resolved) the client checked output_dir against; a worker without
    # VMCRAFT_OUTPUT_ROOTS of its own checks every path it writes against this one.
    output_root: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "disks": [d.to_dict() for d in self.disks],
            "target_format": self.target_format,
            "output_dir": self.output_dir,
            "os": self.os,
            "fixes": self.fixes,
            "dry_run": self.dry_run,
            "host": self.host,
            "host_group": None if self.host_group is None else list(self.host_group),
            "priority": self.priority,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "network": self.network,
            "output_root": self.output_root,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMPlan:
        group = data.get("host_group")
        return cls(
            id=data["id"],
            disks=tuple(DiskPlan.from_dict(d) for d in data["disks"]),
            target_format=data["target_format"],
            output_dir=data["output_dir"],
            os=str(data.get("os", "auto")),
            fixes=bool(data["fixes"]),
            dry_run=bool(data["dry_run"]),
            host=data.get("host"),
            host_group=None if group is None else tuple(group),
            priority=int(data["priority"]),
            memory_mib=int(data["memory_mib"]),
            vcpus=int(data["vcpus"]),
            network=data["network"],
            output_root=data.get("output_root"),
        )


@dataclass(frozen=True)
class BatchPlan:
    batch: str
    manifest_path: str | None
    limits: BatchLimits
    vms: tuple[VMPlan, ...]
    # The one folder the batch summary goes to, and the output root it was checked under.
    summary_dir: str | None = None
    summary_root: str | None = None

    def vms_by_priority(self) -> tuple[VMPlan, ...]:
        """Higher priority first; equal priorities keep manifest order (sorted is stable)."""
        return tuple(sorted(self.vms, key=lambda vm: -vm.priority))

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "manifest_path": self.manifest_path,
            "limits": self.limits.to_dict(),
            "vms": [vm.to_dict() for vm in self.vms],
            "summary_dir": self.summary_dir,
            "summary_root": self.summary_root,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchPlan:
        return cls(
            batch=data["batch"],
            manifest_path=data.get("manifest_path"),
            limits=BatchLimits.from_dict(data.get("limits") or {}),
            vms=tuple(VMPlan.from_dict(vm) for vm in data["vms"]),
            summary_dir=data.get("summary_dir"),
            summary_root=data.get("summary_root"),
        )


# --- reading files ----------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys.

    PyYAML keeps the last of two equal keys silently, so a second `vms:` block would
    drop every VM of the first one without a word.
    """


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<:` merges are meant to be overridden
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping reports it with a better message
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _file_problem(message: str) -> ManifestError:
    return ManifestError([Problem(None, "", message)])


def _detect_format(path: str, text: str) -> str:
    """The format of a manifest: by extension, else by the first character of the content."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return "json"
    if ext in {".yaml", ".yml"}:
        return "yaml"
    return "json" if text.lstrip().startswith(("{", "[")) else "yaml"


def _decode(text: str, fmt: str, name: str) -> object:
    if fmt == "json":
        try:
            return json.loads(text, object_pairs_hook=_unique_json_object)
        except json.JSONDecodeError as exc:
            raise _file_problem(
                f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc
        except _DuplicateKeyError as exc:
            raise _file_problem(f"{name}: invalid JSON: duplicate key {exc.key!r}") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _file_problem(f"{name}: invalid YAML{where}: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise _file_problem(f"{name}: invalid YAML: {exc}") from exc


def _read(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise _file_problem(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise _file_problem(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return _decode(text, _detect_format(path, text), path)


def load_manifest(
    path: str,
    *,
    image_roots: Sequence[str] = (),
    output_roots: Sequence[str] = (),
    check_files: bool = True,
    probe: Probe = probe_image,
) -> BatchPlan:
    """Read and check the YAML or JSON manifest at `path`; raise ManifestError if unusable.

    `output_roots` (VMCRAFT_OUTPUT_ROOTS) bound where outputs may go; without them, the
    manifest's own folder is the only output root.
    """
    path = os.path.abspath(path)
    data = _read(path)
    if not isinstance(data, Mapping):
        raise ManifestError([_not_a_mapping(data)])
    plan = parse_manifest(
        data,
        base_dir=os.path.dirname(path),
        image_roots=image_roots,
        output_roots=output_roots,
        check_files=check_files,
        probe=probe,
    )
    return replace(plan, manifest_path=path)


# --- checking values --------------------------------------------------------------


def _kind(value: object) -> str:
    """The YAML/JSON name of a value's type, which is what the manifest author wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!s}"


def _not_a_mapping(data: object) -> Problem:
    if data is None:
        return Problem(None, "", "the manifest is empty")
    return Problem(
        None, "", f"the manifest must be a mapping with batch and vms, got {_kind(data)}"
    )


def _check_keys(
    raw: Mapping[Any, Any], allowed: Sequence[str], where: _Where, problems: list[Problem]
) -> None:
    for key in raw:
        if key in allowed:
            continue
        message = f"unknown key {key!r} (allowed: {', '.join(allowed)})"
        if "options" in allowed and key in OPTION_KEYS:
            message += f"; {key} belongs under options"
        problems.append(where.key(str(key)).problem(message))


def _string(value: object, where: _Where, problems: list[Problem]) -> str | None:
    if isinstance(value, str):
        if value:
            return value
        problems.append(where.problem("must not be empty"))
        return None
    # YAML reads `off`, `2024-01-05` or `0123` as non-strings; quoting is the fix.
    hint = "" if value is None or isinstance(value, Mapping | list) else " (quote it)"
    problems.append(where.problem(f"expected a string, got {_kind(value)}{hint}"))
    return None


def _integer(
    value: object, where: _Where, problems: list[Problem], *, minimum: int | None = None
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(where.problem(f"expected an integer, got {_kind(value)}"))
        return None
    if minimum is not None and value < minimum:
        problems.append(where.problem(f"must be at least {minimum}, got {value}"))
        return None
    return value


def _boolean(value: object, where: _Where, problems: list[Problem]) -> bool | None:
    if isinstance(value, bool):
        return value
    problems.append(where.problem(f"expected true or false, got {_kind(value)}"))
    return None


def _section(value: object, where: _Where, problems: list[Problem]) -> Mapping[Any, Any]:
    """An optional mapping; an empty `options:` (null in YAML) counts as empty."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return value
    problems.append(where.problem(f"expected a mapping, got {_kind(value)}"))
    return {}


def _identifier(
    raw: Mapping[Any, Any], key: str, where: _Where, problems: list[Problem]
) -> str | None:
    here = where.key(key)
    if key not in raw:
        problems.append(here.problem("required"))
        return None
    value = _string(raw[key], here, problems)
    if value is None:
        return None
    if not ID_PATTERN.fullmatch(value):
        problems.append(here.problem(f"invalid id {value!r}: use 1 to 64 of A-Z a-z 0-9 . _ -"))
        return None
    if set(value) == {"."}:
        # The batch id names the default output directory: ".." would climb out of it.
        problems.append(here.problem(f"invalid id {value!r}: cannot be only dots"))
        return None
    return value


def _vm_identifier(raw: Mapping[Any, Any], where: _Where, problems: list[Problem]) -> str | None:
    """A VM id, which also names its files: it must not take a name the tool uses."""
    vm_id = _identifier(raw, "id", where, problems)
    if vm_id is None:
        return None
    reserved = vm_id_problem(vm_id)
    if reserved:
        problems.append(where.key("id").problem(f"reserved id: {reserved}"))
        return None
    return vm_id


# --- sections ---------------------------------------------------------------------


def _parse_limits(value: object, where: _Where, problems: list[Problem]) -> BatchLimits:
    raw = _section(value, where, problems)
    _check_keys(raw, LIMIT_KEYS, where, problems)
    found: dict[str, int | None] = {}
    for key in LIMIT_KEYS:
        if raw.get(key) is not None:
            found[key] = _integer(raw[key], where.key(key), problems, minimum=1)
    return BatchLimits(**found)


def _parse_options(value: object, where: _Where, problems: list[Problem]) -> dict[str, Any]:
    raw = _section(value, where, problems)
    _check_keys(raw, OPTION_KEYS, where, problems)
    found: dict[str, Any] = {}

    def keep(key: str, checked: object) -> None:
        if checked is not None:
            found[key] = checked

    if "os" in raw:
        choice = _string(raw["os"], where.key("os"), problems)
        if choice is not None and choice not in OS_CHOICES:
            problems.append(
                where.key("os").problem(
                    f"must be one of {', '.join(OS_CHOICES)} (none: a data-only VM), not {choice!r}"
                )
            )
        else:
            keep("os", choice)
    for key in ("fixes", "dry_run"):
        if key in raw:
            keep(key, _boolean(raw[key], where.key(key), problems))
    if "priority" in raw:
        keep("priority", _integer(raw["priority"], where.key("priority"), problems))
    for key in ("memory_mib", "vcpus"):
        if key in raw:
            keep(key, _integer(raw[key], where.key(key), problems, minimum=1))
    if "network" in raw:
        keep("network", _string(raw["network"], where.key("network"), problems))
    # An explicit null placement is kept: it un-pins a VM the defaults would pin.
    if "host" in raw:
        found["host"] = None
        if raw["host"] is not None:
            keep("host", _string(raw["host"], where.key("host"), problems))
    if "host_group" in raw:
        found["host_group"] = None
        if raw["host_group"] is not None:
            keep("host_group", _host_group(raw["host_group"], where.key("host_group"), problems))
    if raw.get("host") is not None and raw.get("host_group") is not None:
        problems.append(
            where.problem("host and host_group are mutually exclusive: pin to one or the other")
        )
    return found


def _host_group(value: object, where: _Where, problems: list[Problem]) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        problems.append(where.problem(f"expected a list of host ids, got {_kind(value)}"))
        return None
    if not value:
        problems.append(where.problem("must list at least one host (leave it out to use any)"))
        return None
    hosts = [_string(h, where.item(i), problems) for i, h in enumerate(value)]
    checked = tuple(h for h in hosts if h is not None)
    return checked if len(checked) == len(hosts) else None


def _parse_settings(
    raw: Mapping[Any, Any], where: _Where, base_dir: str, problems: list[Problem]
) -> dict[str, Any]:
    """The VM fields `raw` sets (and that are valid), options flattened in."""
    found: dict[str, Any] = {}
    if "target_format" in raw:
        here = where.key("target_format")
        fmt = _string(raw["target_format"], here, problems)
        if fmt is not None and fmt not in TARGET_FORMATS:
            problems.append(
                here.problem(
                    f"unsupported target format {fmt!r} (supported: {', '.join(TARGET_FORMATS)})"
                )
            )
        elif fmt is not None:
            found["target_format"] = fmt
    if "output_dir" in raw:
        out = _string(raw["output_dir"], where.key("output_dir"), problems)
        if out is not None:
            found["output_dir"] = os.path.normpath(os.path.join(base_dir, out))
    if "options" in raw:
        found.update(_parse_options(raw["options"], where.key("options"), problems))
    return found


def _merge(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    if any(key in own for key in _PLACEMENT):
        # A VM that says where it runs replaces the default placement as a whole, so
        # pinning one VM of a grouped batch to a host is not a host/host_group clash.
        for key in _PLACEMENT:
            merged.pop(key, None)
    merged.update(own)
    return merged


@dataclass(frozen=True)
class _Context:
    base_dir: str
    roots: tuple[str, ...]
    check_files: bool
    probe: Probe
    default_output_dir: str
    output_roots: tuple[str, ...] = ()
    # Each output folder is checked once; a bad default is reported once, not per VM.
    folders: dict[str, Confined | OutputPathError] = field(default_factory=dict)


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _parse_disk(
    item: object, where: _Where, ctx: _Context, problems: list[Problem]
) -> tuple[str, str, int] | None:
    """(source, format, virtual size) of one `disks` entry."""
    value_where = where
    if isinstance(item, Mapping):
        _check_keys(item, DISK_KEYS, where, problems)
        if "path" not in item:
            problems.append(where.key("path").problem("required"))
            return None
        item, value_where = item["path"], where.key("path")
    elif not isinstance(item, str):
        problems.append(where.problem(f"expected a path or a mapping with path, got {_kind(item)}"))
        return None
    path = _string(item, value_where, problems)
    if path is None:
        return None
    given = os.path.normpath(os.path.join(ctx.base_dir, path))
    # The real path is what is checked and kept, so a symlink cannot lead outside
    # the roots, nor be swapped for another file between this check and the conversion.
    source = os.path.realpath(given)
    if ctx.roots and not _inside(source, ctx.roots):
        shown = path if source == given else f"{path} (resolves to {source})"
        problems.append(
            where.problem(f"{shown}: outside the allowed image roots ({', '.join(ctx.roots)})")
        )
        return None
    if not ctx.check_files:
        return source, FORMAT_HINTS.get(os.path.splitext(source)[1].lower(), "raw"), 0
    try:
        info = ctx.probe(source)
    except ImageError as exc:
        problems.append(where.problem(str(exc)))
        return None
    if info.format not in SUPPORTED_FORMATS:
        problems.append(where.problem(f"{source}: unsupported image format {info.format!r}"))
        return None
    return source, info.format, info.virtual_size


def _parse_disks(
    raw: Mapping[Any, Any], where: _Where, ctx: _Context, problems: list[Problem]
) -> list[tuple[str, str, int]] | None:
    here = where.key("disks")
    if "disks" not in raw:
        problems.append(here.problem("required"))
        return None
    value = raw["disks"]
    if not isinstance(value, list):
        problems.append(here.problem(f"expected a list of disks, got {_kind(value)}"))
        return None
    if not value:
        problems.append(here.problem("must list at least one disk"))
        return None
    disks: list[tuple[str, str, int]] = []
    first_index: dict[str, int] = {}
    ok = True
    for index, item in enumerate(value):
        disk = _parse_disk(item, here.item(index), ctx, problems)
        if disk is None:
            ok = False
            continue
        if disk[0] in first_index:
            problems.append(
                here.item(index).problem(f"{disk[0]}: same disk as disks[{first_index[disk[0]]}]")
            )
            ok = False
            continue
        first_index[disk[0]] = index
        disks.append(disk)
    return disks if ok else None


def disk_target(output_dir: str, vm_id: str, index: int, target_format: str) -> str:
    """Where disk `index` (0-based, as in the manifest) of a VM is converted to."""
    return os.path.join(output_dir, disk_file_name(vm_id, index, target_format))


def _output_folder(
    path: str, origin: _Where, ctx: _Context, problems: list[Problem]
) -> Confined | None:
    """The checked output folder; a problem at `origin` (once per folder unless `origin`
    is the VM's own field) when it lies outside the output roots or is unsafe."""
    first = path not in ctx.folders
    if first:
        try:
            ctx.folders[path] = confine(path, ctx.output_roots)
        except OutputPathError as exc:
            ctx.folders[path] = exc
    checked = ctx.folders[path]
    if isinstance(checked, Confined):
        return checked
    if first or origin.vm is not None:
        prefix = "" if origin.path else "the default output folder "
        problems.append(origin.problem(f"{prefix}{checked}"))
    return None


def _output_origin(own: Mapping[Any, Any], defaults: Mapping[str, Any], where: _Where) -> _Where:
    """Where a VM's output_dir came from, to name it in a problem."""
    if "output_dir" in own:
        return where.key("output_dir")
    if "output_dir" in defaults:
        return _Where(None, "defaults.output_dir")
    return _Where(None, "")


def _parse_vm(
    raw: object,
    where: _Where,
    defaults: Mapping[str, Any],
    ctx: _Context,
    problems: list[Problem],
) -> VMPlan | None:
    if not isinstance(raw, Mapping):
        problems.append(where.problem(f"expected a mapping with id and disks, got {_kind(raw)}"))
        return None
    label = raw.get("id")
    where = _Where(label if isinstance(label, str) and label else None, where.path)
    _check_keys(raw, VM_KEYS, where, problems)
    vm_id = _vm_identifier(raw, where, problems)
    settings = {
        **VM_DEFAULTS,
        "output_dir": ctx.default_output_dir,
        **_merge(defaults, _parse_settings(raw, where, ctx.base_dir, problems)),
    }
    folder = _output_folder(
        settings["output_dir"], _output_origin(raw, defaults, where), ctx, problems
    )
    disks = _parse_disks(raw, where, ctx, problems)
    if vm_id is None or disks is None or folder is None:
        return None
    settings["output_dir"] = folder.path  # symlink-free, as the worker will check it
    return VMPlan(
        id=vm_id,
        disks=tuple(
            DiskPlan(
                source=source,
                format=fmt,
                virtual_size=size,
                target=disk_target(settings["output_dir"], vm_id, n, settings["target_format"]),
            )
            for n, (source, fmt, size) in enumerate(disks)
        ),
        target_format=settings["target_format"],
        output_dir=settings["output_dir"],
        os=settings["os"],
        fixes=settings["fixes"],
        dry_run=settings["dry_run"],
        host=settings["host"],
        host_group=settings["host_group"],
        priority=settings["priority"],
        memory_mib=settings["memory_mib"],
        vcpus=settings["vcpus"],
        network=settings["network"],
        output_root=folder.root,
    )


def _parse_vms(
    value: object,
    where: _Where,
    defaults: Mapping[str, Any],
    ctx: _Context,
    problems: list[Problem],
) -> tuple[VMPlan, ...]:
    if value is None:
        problems.append(where.problem("required: list the VMs of the batch"))
        return ()
    if not isinstance(value, list):
        problems.append(where.problem(f"expected a list of VMs, got {_kind(value)}"))
        return ()
    if not value:
        problems.append(where.problem("must list at least one VM"))
        return ()
    plans: list[tuple[int, VMPlan]] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(value):
        plan = _parse_vm(raw, where.item(index), defaults, ctx, problems)
        # Judged on the raw id, so a duplicate is reported even when the VM has other faults.
        vm_id = raw.get("id") if isinstance(raw, Mapping) else None
        if isinstance(vm_id, str) and ID_PATTERN.fullmatch(vm_id):
            if vm_id in first_index:
                problems.append(
                    _Where(vm_id, where.item(index).key("id").path).problem(
                        f"duplicate id {vm_id!r} (first used by vms[{first_index[vm_id]}])"
                    )
                )
                continue
            first_index[vm_id] = index
        if plan is not None:
            plans.append((index, plan))
    _check_targets(plans, where, problems)
    _check_output_names(plans, where, problems)
    return tuple(plan for _, plan in plans)


def _check_output_names(
    plans: Sequence[tuple[int, VMPlan]], where: _Where, problems: list[Problem]
) -> None:
    # Reserved ids already keep names apart; this catches whatever they miss, so no
    # VM's file can ever be written over another's (case-folded: outputs may live on a
    # case-insensitive share).
    owners: dict[tuple[str, str], str] = {}
    for index, plan in plans:
        for name in vm_file_names(plan.id, len(plan.disks), plan.target_format):
            key = (plan.output_dir, name.casefold())
            other = owners.setdefault(key, plan.id)
            if other != plan.id:
                problems.append(
                    _Where(plan.id, where.item(index).key("id").path).problem(
                        f"its file {name} in {plan.output_dir} is also a file of VM {other!r}"
                    )
                )


def _check_targets(
    plans: Sequence[tuple[int, VMPlan]], where: _Where, problems: list[Problem]
) -> None:
    # qemu-img convert onto its own source destroys the only copy of the disk.
    sources = {disk.source for _, plan in plans for disk in plan.disks}
    for index, plan in plans:
        for n, disk in enumerate(plan.disks):
            if disk.target in sources:
                problems.append(
                    _Where(plan.id, f"{where.item(index).path}.disks[{n}]").problem(
                        f"target {disk.target} would overwrite a source disk: "
                        "choose another output_dir"
                    )
                )


def parse_manifest(
    data: Mapping[str, Any],
    *,
    base_dir: str,
    image_roots: Sequence[str] = (),
    output_roots: Sequence[str] = (),
    check_files: bool = True,
    probe: Probe = probe_image,
) -> BatchPlan:
    """Check parsed manifest data and build its plan; raise ManifestError with every problem.

    Relative paths are taken from `base_dir` (the manifest's directory), which is also
    the only output root unless `output_roots` are given. The disk checks touch the file
    system through `probe` (only when `check_files` is set); the output folder checks
    lstat the parts of each folder that exist.
    """
    if not isinstance(data, Mapping):
        raise ManifestError([_not_a_mapping(data)])
    problems: list[Problem] = []
    top = _Where(None, "")
    base_dir = os.path.abspath(base_dir)
    _check_keys(data, TOP_KEYS, top, problems)
    batch = _identifier(data, "batch", top, problems)
    limits = _parse_limits(data.get("limits"), top.key("limits"), problems)
    defaults_where = top.key("defaults")
    raw_defaults = _section(data.get("defaults"), defaults_where, problems)
    _check_keys(raw_defaults, DEFAULT_KEYS, defaults_where, problems)
    defaults = _parse_settings(raw_defaults, defaults_where, base_dir, problems)
    out_roots = tuple(output_roots) or (base_dir,)
    # With no valid batch id the manifest is refused anyway; any name keeps going.
    name = batch or "batch"
    ctx = _Context(
        base_dir=base_dir,
        roots=tuple(os.path.realpath(r) for r in image_roots),
        check_files=check_files,
        probe=probe,
        default_output_dir=_default_output_dir(base_dir, name, out_roots),
        output_roots=out_roots,
    )
    vms = _parse_vms(data.get("vms"), top.key("vms"), defaults, ctx, problems)
    summary = _summary_folder(vms, name, ctx, problems)
    if problems or batch is None or summary is None:
        raise ManifestError(problems)
    return BatchPlan(
        batch=batch,
        manifest_path=None,
        limits=limits,
        vms=vms,
        summary_dir=summary.path,
        summary_root=summary.root,
    )


def _default_output_dir(base_dir: str, batch: str, output_roots: Sequence[str]) -> str:
    """`<manifest dir>/<batch>`, or `<first output root>/<batch>` when the manifest's
    folder is not under the output roots."""
    beside = os.path.join(base_dir, batch)
    return beside if within(beside, output_roots) else os.path.join(output_roots[0], batch)


def _summary_folder(
    vms: Sequence[VMPlan], batch: str, ctx: _Context, problems: list[Problem]
) -> Confined | None:
    """The ONE folder the batch summary goes to: the VMs' folder when they share one,
    else `<output root of the first VM>/<batch>`; never a parent both happen to share."""
    if not vms:
        return None
    first = vms[0]
    root = first.output_root or ctx.output_roots[0]
    if all(vm.output_dir == first.output_dir for vm in vms):
        path = first.output_dir
    else:
        path = os.path.join(root, batch)
    try:
        summary = confine(path, (root,))
    except OutputPathError as exc:
        problems.append(Problem(None, "", f"the batch summary folder {exc}"))
        return None
    return summary
