"""virtio initramfs config renderers and the VMware-tools link tests, on strings."""

from __future__ import annotations

import pytest

from vmcraft_tasks.craft.fixes.initramfs import ensure_initramfs_modules, render_dracut_virtio_conf
from vmcraft_tasks.craft.fixes.services import (
    is_enablement_dir,
    is_vmware_sysv_link,
    is_vmware_unit_link,
)


def test_dracut_conf_adds_virtio_drivers_with_spaces() -> None:
    conf = render_dracut_virtio_conf()
    assert conf.endswith(
        'add_drivers+=" virtio_blk virtio_scsi virtio_net virtio_pci virtio_console "\n'
    )
    assert all(line.startswith("#") for line in conf.splitlines()[:-1])


def test_initramfs_modules_appends_only_missing() -> None:
    text = (
        "# List of modules that you want to include in your initramfs.\n"
        "# virtio_net  <- only a comment, not a listed module\n"
        "virtio-blk\n"
        "virtio_scsi max_luns=8\n"
        "raid1"
    )
    new, changes = ensure_initramfs_modules(text)
    assert new == text + "\nvirtio_net\nvirtio_pci\n"
    assert [(c.before, c.after) for c in changes] == [(None, "virtio_net"), (None, "virtio_pci")]
    assert ensure_initramfs_modules(new) == (new, [])


def test_initramfs_modules_from_nothing() -> None:
    new, changes = ensure_initramfs_modules("")
    assert new == "virtio_blk\nvirtio_scsi\nvirtio_net\nvirtio_pci\n"
    assert len(changes) == 4


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("multi-user.target.wants", True),
        ("open-vm-tools.service.requires", True),
        ("getty.target.wants.bak", False),
        ("vmtoolsd.service", False),
    ],
)
def test_enablement_dirs(name: str, expected: bool) -> None:
    assert is_enablement_dir(name) is expected


def test_vmware_unit_and_sysv_links() -> None:
    for unit in ("vmtoolsd.service", "vmware-tools.service", "open-vm-tools.service"):
        assert is_vmware_unit_link(unit)
    assert is_vmware_unit_link("vgauth.service") and is_vmware_unit_link("vgauthd.service")
    assert not is_vmware_unit_link("ssh.service")
    assert not is_vmware_unit_link("run-vmblock\\x2dfuse.mount")
    assert is_vmware_sysv_link("S19vmware-tools")
    assert not is_vmware_sysv_link("K08vmware-tools")
    assert not is_vmware_sysv_link("S19vmware-tools-thinprint")
