"""The batch manifest: which VMs to migrate, from which disks, into what.

A manifest is read once, on the submitting side, and turned into a BatchPlan. The
plan (not the YAML) is what travels to workers, so everything that can be wrong with
a manifest is found here, before any VM of the batch starts, and every problem is
reported at once: fixing a 200-VM wave one error per run would take all day.

Its structure (keys, types, ranges, choices) is `vmcraft_tasks.models.manifest`,
whose validation errors become Problems here, worded for the manifest's author; what
needs the file system (disk images, image and output roots, reserved ids, where the
summary goes) is checked here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from vmcraft_tasks.craft.errors import ImageError
from vmcraft_tasks.craft.images import FORMAT_HINTS, SUPPORTED_FORMATS, ImageInfo, probe_image
from vmcraft_tasks.models.manifest import (
    ID_PATTERN,
    OS_CHOICES,
    TARGET_FORMATS,
    VM,
    Defaults,
    Disk,
    Limits,
    Manifest,
    Options,
)
from vmcraft_tasks.models.plan import BatchLimits, BatchPlan, DiskPlan, VMPlan
from vmcraft_tasks.outfiles import (
    Confined,
    OutputPathError,
    confine,
    disk_file_name,
    vm_file_names,
    vm_id_problem,
    within,
)

__all__ = [
    "ID_PATTERN",
    "OS_CHOICES",
    "TARGET_FORMATS",
    "BatchLimits",
    "BatchPlan",
    "DiskPlan",
    "ManifestError",
    "Problem",
    "VMPlan",
    "disk_target",
    "load_manifest",
    "parse_manifest",
]

Probe = Callable[[str], ImageInfo]

VM_DEFAULTS: Mapping[str, Any] = {
    "target_format": VM.model_fields["target_format"].default,
    **{name: info.default for name, info in Options.model_fields.items()},
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
    return plan.model_copy(update={"manifest_path": path})


# --- structure: the models' validation errors, worded for the manifest's author --------


# What a list, or an entry of one, is, by the key that holds it.
_LISTS = {
    "vms": ("a list of VMs", "must list at least one VM"),
    "disks": ("a list of disks", "must list at least one disk"),
    "host_group": ("a list of host ids", "must list at least one host (leave it out to use any)"),
}
_ENTRIES = {"vms": "a mapping with id and disks", "disks": "a path or a mapping with path"}
_CHOICES = {
    "target_format": f"unsupported target format {{!r}} (supported: {', '.join(TARGET_FORMATS)})",
    "os": f"must be one of {', '.join(OS_CHOICES)} (none: a data-only VM), not {{!r}}",
}
# The section whose keys an unknown key's problem lists, by the key that holds it.
_SECTIONS: Mapping[str | None, type[BaseModel]] = {
    None: Manifest,
    "limits": Limits,
    "defaults": Defaults,
    "options": Options,
    "vms": VM,
    "disks": Disk,
}
# The order in which problems of one section are reported (unknown keys first; the
# placement last, as it is checked against the rest; a VM's output folder before its
# disks, which are probed last).
_ORDER = {
    name: n
    for names in (
        "batch limits defaults vms",
        "id target_format output_dir options _folder disks",
        "os fixes dry_run boot_check priority memory_mib vcpus network host host_group",
        "max_parallel max_per_host",
    )
    for n, name in enumerate(names.split())
}
_KEY_ERRORS = ("extra_forbidden", "invalid_key")
_AFTER = 99  # ranks a check of the file system after the structure of the same entry

Loc = tuple[int | str, ...]


class _Found(NamedTuple):
    rank: tuple[int, ...]
    loc: Loc
    problem: Problem


def _structure(data: Mapping[Any, Any]) -> list[_Found]:
    """Every structural problem of the manifest, in the order they are reported."""
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        found = [_found(error, data) for error in exc.errors()]
        return sorted(found, key=lambda f: f.rank)
    return []


def _found(error: ErrorDetails, data: Mapping[Any, Any]) -> _Found:
    loc = error["loc"]
    key_error = error["type"] in _KEY_ERRORS
    # A problem of a whole entry (host and host_group together) follows those of its keys.
    rank = (
        *(
            -1
            if key_error and n == len(loc) - 1
            else p
            if isinstance(p, int)
            else _ORDER.get(p, -1)
            for n, p in enumerate(loc)
        ),
        _AFTER,
    )
    holders = [p for p in (loc[:-1] if key_error else loc) if isinstance(p, str)]
    message = _message(error, holders[-1] if holders else None)
    return _Found(rank, loc, _where(loc, data, key_error=key_error).problem(message))


def _where(loc: Loc, data: Mapping[Any, Any], *, key_error: bool) -> _Where:
    where, node = _Where(None, ""), cast(object, data)
    for n, part in enumerate(loc):
        if isinstance(node, str):
            break  # a disk written as its path: its problems are the disk's
        if isinstance(part, int) and not (key_error and n == len(loc) - 1):
            where = where.item(part)
        else:
            where = where.key(str(part))
        node = node.get(part) if isinstance(node, Mapping) else _item(node, part)
        if n == 1 and loc[0] == "vms":
            where = _Where(_label_of(node), where.path)
    return where


def _item(node: object, part: int | str) -> object:
    ok = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
    return node[part] if ok else None  # type: ignore[index]


def _label_of(vm: object) -> str | None:
    label = vm.get("id") if isinstance(vm, Mapping) else None
    return label if isinstance(label, str) and label else None


def _message(error: ErrorDetails, holder: str | None) -> str:
    kind, value, loc = error["type"], error.get("input"), error["loc"]
    got = _kind(value)
    if kind in _KEY_ERRORS:
        allowed = list(_SECTIONS[holder].model_fields)
        message = f"unknown key {loc[-1]!r} (allowed: {', '.join(allowed)})"
        if "options" in allowed and loc[-1] in Options.model_fields:
            message += f"; {loc[-1]} belongs under options"
        return message
    if holder == "vms" and (kind == "missing" or (kind == "list_type" and value is None)):
        return "required: list the VMs of the batch"
    if kind == "literal_error" and isinstance(value, str) and value and holder in _CHOICES:
        return _CHOICES[holder].format(value)
    if kind in {"string_too_short", "literal_error"} and value == "":
        return "must not be empty"
    messages = {
        "missing": "required",
        "string_pattern_mismatch": f"invalid id {value!r}: use 1 to 64 of A-Z a-z 0-9 . _ -",
        "id_dots": f"invalid id {value!r}: cannot be only dots",
        "int_type": f"expected an integer, got {got}",
        "bool_type": f"expected true or false, got {got}",
        "greater_than_equal": f"must be at least {error.get('ctx', {}).get('ge')}, got {value}",
    }
    if kind in messages:
        return messages[kind]
    if kind in {"string_type", "literal_error"}:
        # YAML reads `off`, `2024-01-05` or `0123` as non-strings; quoting is the fix.
        hint = "" if value is None or isinstance(value, Mapping | list) else " (quote it)"
        return f"expected a string, got {got}{hint}"
    if kind in {"list_type", "too_short"} and holder in _LISTS:
        noun, empty = _LISTS[holder]
        return f"expected {noun}, got {got}" if kind == "list_type" else empty
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        entry = _ENTRIES.get(holder or "") if isinstance(loc[-1], int) else None
        return f"expected {entry or 'a mapping'}, got {got}"
    return error["msg"]


def _bad(found: Sequence[_Found], *prefix: int | str) -> set[int | str]:
    """The keys (or indexes) under `prefix` that have a structural problem."""
    n = len(prefix)
    return {f.loc[n] for f in found if len(f.loc) > n and f.loc[:n] == prefix}


def _settings(raw: Mapping[Any, Any], bad: set[int | str], base_dir: str) -> dict[str, Any]:
    """The VM settings that `raw` (a VM or the defaults) sets validly, options flattened in."""
    found = {key: raw[key] for key in ("target_format", "output_dir") if key in raw}
    found = {key: value for key, value in found.items() if key not in bad}
    if "output_dir" in found:
        found["output_dir"] = os.path.normpath(os.path.join(base_dir, found["output_dir"]))
    if "options" not in bad:
        found.update(raw.get("options") or {})
    return found


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


def _check_disk(path: str, where: _Where, ctx: _Context) -> tuple[str, str, int] | Problem:
    """(source, format, virtual size) of one disk whose entry is valid, or its problem."""
    given = os.path.normpath(os.path.join(ctx.base_dir, path))
    # The real path is what is checked and kept, so a symlink cannot lead outside
    # the roots, nor be swapped for another file between this check and the conversion.
    source = os.path.realpath(given)
    if ctx.roots and not _inside(source, ctx.roots):
        shown = path if source == given else f"{path} (resolves to {source})"
        return where.problem(f"{shown}: outside the allowed image roots ({', '.join(ctx.roots)})")
    if not ctx.check_files:
        return source, FORMAT_HINTS.get(os.path.splitext(source)[1].lower(), "raw"), 0
    try:
        info = ctx.probe(source)
    except ImageError as exc:
        return where.problem(str(exc))
    if info.format not in SUPPORTED_FORMATS:
        return where.problem(f"{source}: unsupported image format {info.format!r}")
    return source, info.format, info.virtual_size


def _check_disks(
    items: Sequence[Any],
    where: _Where,
    bad: set[int | str],
    ctx: _Context,
    problems: list[tuple[tuple[int, ...], Problem]],
) -> list[tuple[str, str, int]] | None:
    disks: list[tuple[str, str, int]] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        if index in bad:
            continue
        here = where.item(index)
        disk = _check_disk(item if isinstance(item, str) else item["path"], here, ctx)
        if not isinstance(disk, Problem) and disk[0] in first_index:
            disk = here.problem(f"{disk[0]}: same disk as disks[{first_index[disk[0]]}]")
        if isinstance(disk, Problem):
            problems.append(((_ORDER["disks"], index, _AFTER), disk))
            bad = bad | {index}
            continue
        first_index[disk[0]] = index
        disks.append(disk)
    return None if bad else disks


def _parse_vm(
    raw: object,
    where: _Where,
    found: Sequence[_Found],
    defaults: Mapping[str, Any],
    ctx: _Context,
) -> tuple[VMPlan | None, list[Problem]]:
    """The VM's plan (None if it cannot have one) and its problems, structural ones
    (`found`, located in the VM) and those of its id, output folder and disks."""
    problems = [(f.rank, f.problem) for f in found]
    if not isinstance(raw, Mapping):
        return None, [p for _, p in problems]
    where = _Where(_label_of(raw), where.path)
    bad = _bad(found)
    vm_id = None if "id" in bad else str(raw["id"])
    reserved = vm_id_problem(vm_id) if vm_id else None
    if reserved:
        problems.append(
            ((_ORDER["id"], _AFTER), where.key("id").problem(f"reserved id: {reserved}"))
        )
        vm_id = None
    settings = {
        **VM_DEFAULTS,
        "output_dir": ctx.default_output_dir,
        **_merge(defaults, _settings(raw, bad, ctx.base_dir)),
    }
    folder_problems: list[Problem] = []
    origin = _output_origin(raw, defaults, where)
    folder = _output_folder(settings["output_dir"], origin, ctx, folder_problems)
    problems += [((_ORDER["_folder"],), p) for p in folder_problems]
    disks = None
    if "disks" in raw and not any(f.loc == ("disks",) for f in found):
        # A disk whose path is valid is checked even when its entry has an unknown key.
        bad_paths = {
            f.loc[1] for f in found if f.loc[:1] == ("disks",) and f.loc[2:] in {(), ("path",)}
        }
        disks = _check_disks(raw["disks"], where.key("disks"), bad_paths, ctx, problems)
    problems.sort(key=lambda rp: rp[0])
    if vm_id is None or disks is None or folder is None:
        return None, [p for _, p in problems]
    return VMPlan(
        id=vm_id,
        disks=tuple(
            DiskPlan(
                source=source,
                format=fmt,
                virtual_size=size,
                target=disk_target(folder.path, vm_id, n, settings["target_format"]),
            )
            for n, (source, fmt, size) in enumerate(disks)
        ),
        # The folder is kept symlink-free, as the worker will check it.
        **{**settings, "output_dir": folder.path},
        output_root=folder.root,
    ), [p for _, p in problems]


def _parse_vms(
    data: Mapping[Any, Any],
    found: Sequence[_Found],
    defaults: Mapping[str, Any],
    ctx: _Context,
    problems: list[Problem],
) -> tuple[VMPlan, ...]:
    value = data.get("vms")
    where = _Where(None, "vms")
    plans: list[tuple[int, VMPlan]] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(value if isinstance(value, list) else []):
        own = [
            f._replace(rank=f.rank[2:], loc=f.loc[2:]) for f in found if f.loc[:2] == ("vms", index)
        ]
        plan, vm_problems = _parse_vm(raw, where.item(index), own, defaults, ctx)
        problems += vm_problems
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
    base_dir = os.path.abspath(base_dir)
    found = _structure(data)
    problems = [f.problem for f in found if f.loc[:1] != ("vms",) or len(f.loc) == 1]
    top = _bad(found)
    batch = None if "batch" in top else str(data["batch"])
    limits = BatchLimits() if "limits" in top else BatchLimits(**(data.get("limits") or {}))
    # Defaults with a fault inside still apply, so their output folder is checked.
    raw_defaults = {} if any(f.loc == ("defaults",) for f in found) else data.get("defaults") or {}
    defaults = _settings(raw_defaults, _bad(found, "defaults"), base_dir)
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
    vms = _parse_vms(data, found, defaults, ctx, problems)
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
