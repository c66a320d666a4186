"""The private LVM configuration of one call (pure).

lvm2's tools read VG metadata from whatever devices their configuration admits. Every
call made through `craft.lvm.tools` gets its own `LVM_SYSTEM_DIR`, holding an
`lvm.conf` written here:

- `devices/filter` and `devices/global_filter` accept exactly the given device paths
  (anchored, escaped regexes) and reject everything else, so no host disk is ever
  opened, let alone changed;
- no devices file (`use_devicesfile = 0`), no hints (`hints = "none"`), no udev
  (`obtain_device_list_from_udev = 0`, `external_device_info_source = "none"`,
  `activation/udev_sync = 0`, `udev_rules = 0`), no multipath/md component checks
  (they read /etc/multipath and /sys of other disks);
- no activation at all (`global/activation = 0`: lvm never talks to device-mapper),
  no monitoring, no lvmpolld, no lvmlockd, no D-Bus notification, no event activation;
- `backup { backup = 0 archive = 0 }`, with their directories inside the private dir
  anyway; locking (`global/locking_dir`), `global/etc` and the profile directory are
  inside it too, so /etc/lvm and /run/lock/lvm are never read or written.
- read-only by default (`global/metadata_read_only = 1`); only sample builds write
  (pvcreate, vgcfgrestore) with `writable=True`.

The names are those of Debian 12's lvm2 2.03.16 (`lvmconfig --type default`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

# Regex metacharacters of lvm2's filter regex engine (libdm regex), plus the `|`
# we use as delimiter. Each is matched literally once escaped with a backslash.
_REGEX_SPECIAL = re.compile(r"([\\.^$|()\[\]{}*+?])")
# What may appear in an admitted device path: no quote, no backslash, no control or
# space character (the config file's string syntax and lvm's own name handling).
_SAFE_PATH = re.compile(r"/[A-Za-z0-9/._+:@=,#%~-]+")


def escape_regex(text: str) -> str:
    """`text` with every metacharacter of lvm2's regex syntax backslash-escaped."""
    return _REGEX_SPECIAL.sub(r"\\\1", text)


def device_regex(path: str) -> str:
    """`path` as an anchored, escaped lvm2 regex body: matches that path and no other."""
    check_device_path(path)
    return "^" + escape_regex(path) + "$"


def check_device_path(path: str) -> None:
    """Refuse device paths a filter cannot express exactly (ValueError)."""
    if not _SAFE_PATH.fullmatch(path) or "//" in path or "/../" in path or path.endswith("/.."):
        raise ValueError(f"not a device path lvm's filter can admit exactly: {path!r}")


def filter_list(devices: Sequence[str]) -> list[str]:
    """The filter entries: accept each device (in order), then reject everything."""
    if not devices:
        raise ValueError("an LVM filter needs at least one device to admit")
    return [f"a|{device_regex(d)}|" for d in devices] + ["r|.*|"]


def _conf_string(value: str) -> str:
    # The string syntax of lvm.conf: double quotes; a backslash escapes the next
    # character. Our filter entries hold backslashes (regex escapes) but no quote.
    return '"' + value.replace("\\", "\\\\") + '"'


def _conf_list(values: Sequence[str]) -> str:
    return "[ " + ", ".join(_conf_string(v) for v in values) + " ]"


def lvm_conf(devices: Sequence[str], system_dir: str, *, writable: bool = False) -> str:
    """The whole `lvm.conf` of one call restricted to `devices` (pure).

    `system_dir` is the call's private `LVM_SYSTEM_DIR`: the lock, backup, archive
    and profile directories and `global/etc` are all inside it.
    """
    filters = _conf_list(filter_list(devices))
    d = system_dir.rstrip("/")
    ro = 0 if writable else 1
    return f"""\
# vmcraft: private configuration for one lvm call; admits only this VM's devices.
config {{
    checks = 1
    profile_dir = {_conf_string(d + "/profile")}
}}
devices {{
    dir = "/dev"
    scan = [ "/dev" ]
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    hints = "none"
    use_devicesfile = 0
    devicesfile = "vmcraft-none.devices"
    filter = {filters}
    global_filter = {filters}
    sysfs_scan = 1
    scan_lvs = 0
    multipath_component_detection = 0
    multipath_wwids_file = ""
    md_component_detection = 0
    fw_raid_component_detection = 0
}}
log {{
    verbose = 0
    syslog = 0
    level = 0
    command_names = 0
    prefix = ""
}}
backup {{
    backup = 0
    archive = 0
    backup_dir = {_conf_string(d + "/backup")}
    archive_dir = {_conf_string(d + "/archive")}
}}
global {{
    umask = 077
    activation = 0
    etc = {_conf_string(d)}
    locking_dir = {_conf_string(d + "/lock")}
    wait_for_locks = 0
    metadata_read_only = {ro}
    event_activation = 0
    use_lvmlockd = 0
    use_lvmpolld = 0
    notify_dbus = 0
    system_id_source = "none"
}}
activation {{
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 0
    monitoring = 0
    auto_set_activation_skip = 1
    auto_activation_volume_list = [ ]
    volume_list = [ ]
}}
"""


def lvm_env(system_dir: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one lvm call: its private system dir, no udev, no fd warnings.

    `base` (default: this process's environment) loses every other `LVM_*` and `DM_*`
    variable, so a caller's own LVM settings cannot leak in.
    """
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(("LVM_", "DM_"))
    }
    env.update(
        LVM_SYSTEM_DIR=system_dir,
        LVM_SUPPRESS_FD_WARNINGS="1",
        DM_DISABLE_UDEV="1",
        LC_ALL="C",
    )
    return env
