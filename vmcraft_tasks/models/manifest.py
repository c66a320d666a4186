"""The batch manifest as users write it (YAML or JSON): its keys, types and limits.

These models are the manifest's structure, and the source of its JSON Schema
(`vmcraft-tasks schema manifest`). What needs the file system (probing disks, the
image and output roots, reserved ids, where the summary goes) is checked by
`scheduler.manifest`, which also turns validation errors into manifest problems.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError

# Ids become file names, libvirt domain names and Redis keys: keep them to a charset
# that is safe in all three.
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TARGET_FORMATS = ("qcow2", "raw")
# `os: none` declares a data-only VM (no operating system expected on its disks);
# `auto` (the default) requires one to be found.
OS_CHOICES = ("auto", "none")

Text = Annotated[str, StringConstraints(strict=True, min_length=1)]
Count = Annotated[int, Field(strict=True, ge=1)]


def _not_only_dots(value: str) -> str:
    # The batch id names the default output directory: ".." would climb out of it.
    if set(value) == {"."}:
        raise PydanticCustomError("id_dots", "invalid id: cannot be only dots")
    return value


Identifier = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, pattern=f"^{ID_PATTERN.pattern}$"),
    AfterValidator(_not_only_dots),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    """How much of the batch runs at once (leave a key out for no limit)."""

    max_parallel: Count | None = Field(None, description="VMs of the batch in flight at once")
    max_per_host: Count | None = Field(None, description="VMs of the batch per host at once")


class Options(_Section):
    """What is done to a VM, and where it runs."""

    os: Literal["auto", "none"] = Field(
        "auto", description="auto: an OS must be found; none: a data-only VM"
    )
    fixes: StrictBool = Field(True, description="fix the guest for KVM (fstab, drivers, ...)")
    dry_run: StrictBool = Field(False, description="report the fixes without applying them")
    boot_check: StrictBool = Field(
        False, description="boot the migrated disks headless and judge the console"
    )
    host: Text | None = Field(None, description="the one host the VM runs on")
    host_group: Annotated[list[Text], Field(min_length=1)] | None = Field(
        None, description="the hosts the VM may run on"
    )
    priority: Annotated[int, Field(strict=True)] = Field(
        0, description="higher runs first; equal priorities keep manifest order"
    )
    memory_mib: Count = 2048
    vcpus: Count = 2
    network: Text = Field("default", description="the libvirt network of the VM's NIC")

    @model_validator(mode="wrap")
    @classmethod
    def _one_placement(cls, value: Any, handler: ModelWrapValidatorHandler[Options]) -> Options:
        # Judged on what was written, so the clash is reported with the other problems.
        both = isinstance(value, Mapping) and None not in (
            value.get("host"),
            value.get("host_group"),
        )
        clash = PydanticCustomError(
            "placement", "host and host_group are mutually exclusive: pin to one or the other"
        )
        try:
            options = handler(value)
        except ValidationError as exc:
            if not both:
                raise
            errors = [cast(InitErrorDetails, e) for e in exc.errors(include_url=False)]
            errors.append({"type": clash, "loc": (), "input": value})
            raise ValidationError.from_exception_data(exc.title, errors) from None
        if both:
            raise clash
        return options


class _PathOrDisk:
    """A disk is written as its path, or as a mapping with `path`."""

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [{"type": "string", "minLength": 1}, handler(core_schema)]}


class Disk(_Section):
    """One source disk; relative paths are taken from the manifest's folder."""

    path: Text

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # it depends on where the manifest is


TargetFormat = Literal["qcow2", "raw"]
OutputDir = Annotated[
    Text,
    Field(
        description="where the converted disks, domain XML and reports go (default: "
        "<manifest folder>/<batch>); relative paths are taken from the manifest's folder",
        json_schema_extra=_no_default,
    ),
]


class Defaults(_Section):
    """Settings of every VM that does not set them itself (options merge key by key)."""

    target_format: TargetFormat = "qcow2"
    output_dir: OutputDir = Field(None)  # type: ignore[assignment]
    options: Options | None = None


class VM(_Section):
    """One VM of the batch."""

    id: Identifier
    disks: Annotated[list[Annotated[Disk, _PathOrDisk]], Field(min_length=1)]
    target_format: TargetFormat = "qcow2"
    output_dir: OutputDir = Field(None)  # type: ignore[assignment]
    options: Options | None = None


class Manifest(_Section):
    """A batch manifest: which VMs to migrate, from which disks, into what."""

    model_config = ConfigDict(title="vmcraft-tasks batch manifest")

    batch: Identifier
    defaults: Defaults | None = None
    limits: Limits | None = None
    vms: Annotated[list[VM], Field(min_length=1)]
