"""Inspecting real guests, and reading their files safely."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.errors import GuestPathError, VMCraftError
from vmcraft_tasks.craft.vmcraft import VMCraft


@pytest.mark.parametrize("fixture", ["linux_gpt_raw", "linux_gpt_vmdk"])
def test_debian_guest_facts(request, fixture):
    built = request.getfixturevalue(fixture)
    notes = built.notes
    with VMCraft(built.path) as g:
        roots = g.inspect_os()
        assert len(roots) == 1
        root = roots[0]
        assert root.root_partition == notes["root_partition"]
        assert (root.type, root.distro, root.major, root.minor) == ("linux", "debian", 12, 5)
        assert root.product_name == notes["os_release"]["PRETTY_NAME"]
        assert root.arch == "x86_64"
        assert root.hostname == notes["hostname"]
        assert root.package_format == "deb"
        resolved = {e.entry.mountpoint: e.resolved_partition for e in root.fstab}
        expected = {mp: n for n, mp in notes["mountpoints"].items()}
        expected["none"] = expected.pop("swap")
        assert {mp: resolved[mp] for mp in expected} == expected
        assert resolved["/proc"] is None
        how = {e.entry.mountpoint: e.how for e in root.fstab if e.resolved_partition}
        assert {how["/"], how["/boot"], how["/var"], how["/home"]} >= {
            "device-name",
            "uuid",
            "label",
            "partuuid",
        }


def test_rocky_guest_on_mbr_with_logical_partitions(mbr_logical_raw):
    with VMCraft(mbr_logical_raw.path) as g:
        (root,) = g.inspect_os()
        assert (root.distro, root.major, root.minor, root.hostname) == ("rocky", 9, 3, "db02")
        assert root.package_format == "rpm"
        assert {
            e.entry.mountpoint: e.resolved_partition for e in root.fstab if e.kind == "device"
        } == {
            "/": 1,
            "/data": 5,
        }


def test_windows_guest_version_from_the_registry(windows_ntfs_raw):
    facts = windows_ntfs_raw.notes["windows"]
    with VMCraft(windows_ntfs_raw.path) as g:
        (root,) = g.inspect_os()
        assert root.type == "windows"
        assert root.product_name == facts["product_name"]
        assert (root.major, root.minor) == (facts["major"], facts["minor"])
        assert root.hostname == facts["hostname"]
        assert root.arch == facts["arch"]


def test_disk_without_an_os_has_no_roots(twenty_parts_raw):
    with VMCraft(twenty_parts_raw.path) as g:
        report = g.inspect()
        assert report.roots == []
        assert len(report.mounts) == 20 and all(report.mounts.values())


def test_guest_symlinks_never_reach_host_files(linux_gpt_raw):
    markers = linux_gpt_raw.notes["guest_markers"]
    with open("/etc/passwd") as fh:
        host_passwd = fh.read()
    with VMCraft(linux_gpt_raw.path) as g:
        (root,) = g.inspect_os()
        guest = g.guest(root)
        # Absolute and ../ symlinks resolve inside the guest, to the guest's own files.
        assert markers["/etc/shadow"] in guest.cat("/etc/evil_abs")
        assert markers["/etc/passwd"] in guest.cat("/etc/evil_rel")
        assert guest.cat("/etc/evil_rel") != host_passwd
        assert guest.cat("/../../../../etc/passwd") == guest.cat("/etc/passwd")
        assert sorted(guest.ls("/root/escape_dir")) == sorted(guest.ls("/"))
        assert guest.is_file("/etc/os-release") and guest.is_dir("/usr/bin")
        assert guest.exists("/etc/hostname") and not guest.exists("/etc/no-such-file")
        assert guest.read_file("/etc/hostname") == b"web01\n"
        with pytest.raises(GuestPathError):
            guest.cat("/etc/no-such-file")


def test_guest_access_needs_an_inspected_root(linux_gpt_raw):
    with VMCraft(linux_gpt_raw.path) as g, pytest.raises(VMCraftError, match="not mounted"):
        g.guest(3)
