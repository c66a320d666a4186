"""The private lvm.conf: a filter admitting exactly the given devices, nothing of the host."""

from __future__ import annotations

import re

import pytest

from vmcraft_tasks.craft.lvm import config


def lvm_filter_accepts(entries: list[str], path: str) -> bool:
    """lvm2's filter semantics, for one device name: the first matching entry decides.

    The escaped regex bodies use only syntax Python's `re` reads the same way
    (anchors, backslash-escaped metacharacters).
    """
    for entry in entries:
        kind, delim, body = entry[0], entry[1], entry[2:]
        assert body.endswith(delim)
        if re.search(body[:-1], path):
            return kind == "a"
    return True


def test_filter_accepts_exactly_the_given_devices():
    devices = ["/dev/loop7", "/dev/nbd0p3"]
    entries = config.filter_list(devices)
    assert entries == ["a|^/dev/loop7$|", "a|^/dev/nbd0p3$|", "r|.*|"]
    for path in devices:
        assert lvm_filter_accepts(entries, path)
    for other in (
        "/dev/loop70",
        "/dev/loop",
        "/dev/sda",
        "/dev/nbd0p",
        "/dev/nbd0p33",
        "/dev/mapper/rl-root",
        "/dev/dm-0",
        "/dev/loop7/x",
        "x/dev/loop7",
    ):
        assert not lvm_filter_accepts(entries, other), other


def test_regex_metacharacters_are_escaped():
    text = "a.b+c(1)[2]{3}$^*?|\\"
    escaped = config.escape_regex(text)
    assert escaped == r"a\.b\+c\(1\)\[2\]\{3\}\$\^\*\?\|\\"
    assert re.fullmatch(escaped, text)
    body = config.device_regex("/dev/disk/by-id/nvme-X_1.2+3:4")
    assert body == r"^/dev/disk/by-id/nvme-X_1\.2\+3:4$"
    # `.` is literal: a name differing there is rejected.
    assert not re.search(config.device_regex("/dev/a.b"), "/dev/aXb")
    assert not lvm_filter_accepts(config.filter_list(["/dev/a.b"]), "/dev/aXb")
    assert lvm_filter_accepts(config.filter_list(["/dev/a.b"]), "/dev/a.b")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "dev/loop0",
        '/dev/lo"op',
        "/dev/lo\\op",
        "/dev/lo op",
        "/dev/loop0\n",
        "/dev/../sda",
        "/dev//sda",
        "/dev/a|b",
    ],
)
def test_paths_a_filter_cannot_express_exactly_are_refused(bad):
    with pytest.raises(ValueError):
        config.filter_list([bad])


def test_no_devices_is_refused():
    with pytest.raises(ValueError):
        config.filter_list([])


def test_conf_turns_off_everything_host_wide():
    text = config.lvm_conf(["/dev/loop3"], "/tmp/vmcraft-lvm-x")
    for line in (
        "use_devicesfile = 0",
        'hints = "none"',
        "obtain_device_list_from_udev = 0",
        'external_device_info_source = "none"',
        "udev_sync = 0",
        "udev_rules = 0",
        "backup = 0",
        "archive = 0",
        "activation = 0",
        "monitoring = 0",
        "use_lvmlockd = 0",
        "use_lvmpolld = 0",
        "notify_dbus = 0",
        "event_activation = 0",
        "metadata_read_only = 1",
        'locking_dir = "/tmp/vmcraft-lvm-x/lock"',
        'backup_dir = "/tmp/vmcraft-lvm-x/backup"',
        'archive_dir = "/tmp/vmcraft-lvm-x/archive"',
        'etc = "/tmp/vmcraft-lvm-x"',
        'filter = [ "a|^/dev/loop3$|", "r|.*|" ]',
        'global_filter = [ "a|^/dev/loop3$|", "r|.*|" ]',
    ):
        assert line in text, line
    assert "/etc/lvm" not in text and "/run/lvm" not in text and "/run/lock" not in text
    assert "metadata_read_only = 0" in config.lvm_conf(["/dev/loop3"], "/x", writable=True)


def test_backslashes_are_doubled_in_the_config_string():
    text = config.lvm_conf(["/dev/a.b"], "/x")
    assert r'"a|^/dev/a\\.b$|"' in text


def test_env_points_at_the_private_dir_and_drops_callers_lvm_settings():
    env = config.lvm_env("/tmp/p", {"PATH": "/bin", "LVM_SYSTEM_DIR": "/etc/lvm", "DM_X": "1"})
    assert env == {
        "PATH": "/bin",
        "LVM_SYSTEM_DIR": "/tmp/p",
        "LVM_SUPPRESS_FD_WARNINGS": "1",
        "DM_DISABLE_UDEV": "1",
        "LC_ALL": "C",
    }
