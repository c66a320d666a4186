"""Run lvm2's tools restricted to given devices (edge).

Each call writes a fresh private `LVM_SYSTEM_DIR` (config from `craft.lvm.config`),
runs the command through `craft.commands.run`, and removes the directory afterwards,
whatever happened. Nothing outside that directory is configured, locked, cached or
backed up; the host's /etc/lvm is never read and its VGs are never scanned.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.commands import CommandResult
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.lvm import config

LVM_TIMEOUT_S = 60.0
# lvm2 programs this module runs (as `lvm <command>`: one binary, no symlink needed).
READ_COMMANDS = frozenset({"pvs", "vgs", "lvs", "lvmconfig", "pvck", "vgcfgbackup"})
WRITE_COMMANDS = frozenset({"pvcreate", "vgcfgrestore"})

# The report fields `report()` asks for; `craft.lvm.layout` parses exactly these.
PV_FIELDS = (
    "vg_name",
    "vg_uuid",
    "vg_extent_size",
    "pv_name",
    "pv_uuid",
    "pe_start",
    "pv_size",
    "dev_size",
    "pv_pe_count",
    "pv_missing",
    "pv_attr",
)
LV_FIELDS = (
    "vg_name",
    "vg_uuid",
    "vg_extent_size",
    "lv_name",
    "lv_uuid",
    "lv_attr",
    "lv_size",
    "segtype",
    "seg_start_pe",
    "seg_size_pe",
    "seg_pe_ranges",
    "devices",
    "pool_lv",
    "origin",
    "lv_layout",
    "lv_role",
    "stripes",
    "data_lv",
    "metadata_lv",
    "lv_parent",
)
PVSEG_FIELDS = (
    "vg_uuid",
    "pv_uuid",
    "pv_name",
    "pvseg_start",
    "pvseg_size",
    "lv_uuid",
    "lv_name",
    "seg_start_pe",
    "segtype",
)


def run_lvm(
    command: str,
    args: Sequence[str],
    devices: Sequence[str],
    *,
    writable: bool = False,
    timeout: float = LVM_TIMEOUT_S,
    check: bool = True,
) -> CommandResult:
    """`lvm <command> <args>` seeing only `devices`; its private system dir is removed after.

    `command` must be one of READ_COMMANDS, or of WRITE_COMMANDS with `writable=True`.
    """
    if command in WRITE_COMMANDS:
        if not writable:
            raise ValueError(f"lvm {command} writes metadata: pass writable=True")
    elif command not in READ_COMMANDS:
        raise ValueError(f"lvm {command} is not a command this module runs")
    system_dir = tempfile.mkdtemp(prefix="vmcraft-lvm-")
    try:
        for sub in ("lock", "backup", "archive", "profile"):
            os.mkdir(os.path.join(system_dir, sub), 0o700)
        with open(os.path.join(system_dir, "lvm.conf"), "w") as fh:
            fh.write(config.lvm_conf(devices, system_dir, writable=writable))
        return commands.run(
            ["lvm", command, *args],
            timeout=timeout,
            check=check,
            env=config.lvm_env(system_dir),
        )
    finally:
        shutil.rmtree(system_dir, ignore_errors=True)


def report_json(
    command: str, fields: Sequence[str], devices: Sequence[str], *extra: str
) -> dict[str, Any]:
    """`lvm pvs|vgs|lvs --reportformat json` of `fields`, sizes in bytes without suffix."""
    result = run_lvm(
        command,
        [
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "--all",
            "-o",
            ",".join(fields),
            *extra,
        ],
        devices,
        # A VG with a PV missing still reports (with warnings on stderr, exit 0 or 5).
        check=False,
    )
    try:
        data: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise CommandError(
            list(result.argv), result.returncode, result.stderr, result.stdout
        ) from exc
    return data


def report(devices: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The three reports `craft.lvm.layout.parse` reads: {"pvs", "lvs", "pvsegs"}."""
    return {
        "pvs": report_json("pvs", PV_FIELDS, devices),
        "lvs": report_json("lvs", LV_FIELDS, devices, "--segments"),
        "pvsegs": report_json("pvs", PVSEG_FIELDS, devices, "--segments"),
    }
