"""Guest capabilities: the record, Linux and Windows derivation, and the kernel module reader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks.craft.guestcaps import (
    CAPS_UNKNOWN,
    CAPS_UNKNOWN_REASON,
    GuestCaps,
    KernelDrivers,
    WindowsDriver,
    WindowsDrivers,
    caps_or_unknown,
    kernel_drivers,
    linux_caps,
    linux_kernel_facts,
    module_name,
    normalise_module,
    unknown_os_caps,
    windows_caps,
)
from vmcraft_tasks.craft.guestpath import GuestFS

VIRTIO_BOOT = frozenset({"virtio_blk", "virtio_pci"})
VIRTIO_ALL = frozenset({"virtio_blk", "virtio_pci", "virtio_net"})


def kernel(
    version: str = "6.1.0-18-amd64",
    initramfs: frozenset[str] | None = VIRTIO_BOOT,
    builtin: frozenset[str] = frozenset(),
    installed: frozenset[str] = VIRTIO_ALL,
) -> KernelDrivers:
    return KernelDrivers(version, initramfs, builtin, installed)


# --- the record ---------------------------------------------------------------------


def test_round_trip() -> None:
    caps = GuestCaps("sata", "virtio", False, True, ("no virtio_blk",), ("kernel x: ...",))
    assert GuestCaps.from_dict(caps.to_dict()) == caps
    assert caps.to_dict() == {
        "block_bus": "sata",
        "net_model": "virtio",
        "virtio_blk": False,
        "virtio_net": True,
        "reasons": ["no virtio_blk"],
        "evidence": ["kernel x: ..."],
    }


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"block_bus": "virtio", "virtio_blk": False}, "without a virtio_blk"),
        ({"net_model": "virtio", "virtio_net": False}, "without a virtio_net"),
        ({"block_bus": "ide"}, "block bus"),
        ({"net_model": "rtl8139"}, "net model"),
        ({"block_bus": "sata", "reasons": ()}, "needs a reason"),
    ],
)
def test_inconsistent_caps_cannot_be_built(fields: dict[str, Any], match: str) -> None:
    values: dict[str, Any] = {
        "block_bus": "virtio",
        "net_model": "virtio",
        "virtio_blk": True,
        "virtio_net": True,
        "reasons": (),
    }
    values.update(fields)
    with pytest.raises(ValueError, match=match):
        GuestCaps(**values)


@pytest.mark.parametrize(
    "data",
    [
        {"block_bus": "virtio"},
        {"block_bus": "sata", "net_model": "e1000e", "virtio_blk": "no", "virtio_net": False},
        {
            "block_bus": "sata",
            "net_model": "e1000e",
            "virtio_blk": False,
            "virtio_net": False,
            "reasons": "one string",
        },
    ],
)
def test_from_dict_refuses_bad_records(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="guestcaps"):
        GuestCaps.from_dict(data)


def test_caps_or_unknown() -> None:
    virtio = GuestCaps("virtio", "virtio", True, True)
    assert caps_or_unknown(virtio.to_dict()) == virtio
    assert caps_or_unknown(None) is CAPS_UNKNOWN
    assert CAPS_UNKNOWN.reasons == (CAPS_UNKNOWN_REASON,)
    assert "capabilities unknown" in CAPS_UNKNOWN_REASON
    broken = caps_or_unknown({"block_bus": "virtio"})
    assert (broken.block_bus, broken.net_model) == ("sata", "e1000e")
    assert "unreadable" in broken.reasons[0]


@pytest.mark.parametrize(("os_type", "word"), [(None, "no operating system"), ("unknown", "type")])
def test_unknown_os_is_compatibility_mode(os_type: str | None, word: str) -> None:
    caps = unknown_os_caps(os_type)
    assert (caps.block_bus, caps.net_model, caps.virtio_blk, caps.virtio_net) == (
        "sata",
        "e1000e",
        False,
        False,
    )
    assert word in caps.reasons[0]


# --- Linux --------------------------------------------------------------------------


def test_virtio_in_every_initramfs() -> None:
    caps = linux_caps([kernel("6.1.0-18"), kernel("6.1.0-17")])
    assert (caps.block_bus, caps.net_model, caps.virtio_blk, caps.virtio_net) == (
        "virtio",
        "virtio",
        True,
        True,
    )
    assert caps.reasons == ()
    assert caps.evidence == (
        "kernel 6.1.0-18: virtio_blk in initramfs, virtio_pci in initramfs, virtio_net installed",
        "kernel 6.1.0-17: virtio_blk in initramfs, virtio_pci in initramfs, virtio_net installed",
    )


def test_built_in_drivers_count_for_boot() -> None:
    # Ubuntu-style: virtio_blk and virtio_pci are =y, so the initramfs lists neither.
    caps = linux_caps(
        [kernel(initramfs=frozenset({"ext4"}), builtin=VIRTIO_ALL, installed=frozenset())]
    )
    assert (caps.block_bus, caps.net_model) == ("virtio", "virtio")
    assert "virtio_blk built in" in caps.evidence[0]


def test_initramfs_without_virtio_blk_is_sata_with_the_kernel_named() -> None:
    caps = linux_caps([kernel("4.18.0-513.el8", initramfs=frozenset({"virtio_pci", "mptspi"}))])
    assert (caps.block_bus, caps.net_model) == ("sata", "virtio")
    assert caps.reasons == (
        "kernel 4.18.0-513.el8: virtio_blk neither in its initramfs nor built in: disks on SATA",
    )


def test_virtio_pci_is_needed_at_boot_too() -> None:
    caps = linux_caps([kernel(initramfs=frozenset({"virtio_blk"}))])
    assert caps.block_bus == "sata"
    assert "virtio_pci neither in its initramfs" in caps.reasons[0]


def test_installed_virtio_blk_is_not_enough_for_boot() -> None:
    caps = linux_caps([kernel(initramfs=frozenset(), installed=VIRTIO_ALL)])
    assert (caps.block_bus, caps.net_model) == ("sata", "virtio")


def test_one_kernel_without_virtio_blk_is_enough_for_sata() -> None:
    good = kernel("6.1.0-18")
    bad = kernel("6.1.0-10", initramfs=frozenset({"ahci"}))
    caps = linux_caps([good, bad])
    assert caps.block_bus == "sata"
    assert len(caps.reasons) == 1
    assert caps.reasons[0].startswith("kernel 6.1.0-10:")


def test_unreadable_initramfs_only_trusts_built_in_drivers() -> None:
    caps = linux_caps([kernel("5.14", initramfs=None)])
    assert caps.block_bus == "sata"
    assert caps.reasons[0] == (
        "kernel 5.14: initramfs unreadable and virtio_blk, virtio_pci not built in: disks on SATA"
    )
    assert linux_caps([kernel(initramfs=None, builtin=VIRTIO_BOOT)]).block_bus == "virtio"


def test_no_virtio_net_is_e1000e() -> None:
    caps = linux_caps([kernel(installed=frozenset({"virtio_blk", "virtio_pci", "e1000e"}))])
    assert (caps.block_bus, caps.net_model, caps.virtio_net) == ("virtio", "e1000e", False)
    assert caps.reasons == (
        "kernel 6.1.0-18-amd64: virtio_net neither installed nor built in: NIC is e1000e",
    )


def test_no_virtio_at_all() -> None:
    caps = linux_caps([kernel(initramfs=frozenset({"ahci"}), installed=frozenset({"e1000e"}))])
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")
    assert len(caps.reasons) == 2


def test_no_kernel_is_compatibility_mode() -> None:
    caps = linux_caps([])
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")
    assert "no bootable kernel" in caps.reasons[0]


def test_module_names_are_normalised() -> None:
    k = KernelDrivers(
        "6.8",
        frozenset({"virtio-blk", "kernel/drivers/virtio/virtio_pci.ko.zst"}),
        frozenset({"kernel/drivers/net/virtio-net.ko"}),
        frozenset({"e1000e.ko.xz"}),
    )
    assert k.initramfs_modules == VIRTIO_BOOT
    assert k.builtin == frozenset({"virtio_net"})
    assert k.installed == frozenset({"e1000e"})
    assert linux_caps([k]).net_model == "virtio"
    assert KernelDrivers.from_dict(k.to_dict()) == k


@pytest.mark.parametrize(
    ("file_name", "want"),
    [
        ("virtio_blk.ko", "virtio_blk"),
        ("virtio-blk.ko.xz", "virtio_blk"),
        ("kernel/drivers/net/virtio_net.ko.zst", "virtio_net"),
        ("e1000e.ko.gz", "e1000e"),
        ("modules.dep", None),
        (".ko", None),
        ("virtio_blk.ko.bz2", None),
    ],
)
def test_module_name(file_name: str, want: str | None) -> None:
    assert module_name(file_name) == want


def test_normalise_module() -> None:
    assert normalise_module("virtio-blk") == "virtio_blk"
    assert normalise_module("drivers/virtio_pci.ko") == "virtio_pci"


# --- reading kernel modules from a guest tree ---------------------------------------


def guest_kernel(root: Path, version: str = "6.1.0-18-amd64") -> Path:
    base = root / "lib" / "modules" / version
    drivers = base / "kernel" / "drivers"
    (drivers / "block").mkdir(parents=True)
    (drivers / "net").mkdir(parents=True)
    (drivers / "virtio").mkdir(parents=True)
    (drivers / "block" / "virtio_blk.ko.xz").write_bytes(b"")
    (drivers / "net" / "virtio-net.ko.zst").write_bytes(b"")
    (drivers / "net" / "e1000e.ko.gz").write_bytes(b"")
    (drivers / "virtio" / "README").write_text("not a module\n")
    (base / "updates").mkdir()
    (base / "updates" / "vendor_nic.ko").write_bytes(b"")
    (base / "modules.builtin").write_text(
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio.ko\n\n"
    )
    return base


def test_linux_kernel_facts(tmp_path: Path) -> None:
    guest_kernel(tmp_path)
    notes: list[str] = []
    builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1.0-18-amd64", notes)
    assert builtin == frozenset({"virtio_pci", "virtio"})
    assert installed == frozenset({"virtio_blk", "virtio_net", "e1000e", "vendor_nic"})
    assert notes == []


def test_kernel_drivers_feeds_linux_caps(tmp_path: Path) -> None:
    guest_kernel(tmp_path)
    k = kernel_drivers(GuestFS(str(tmp_path)), "6.1.0-18-amd64", frozenset({"virtio_blk"}))
    assert k.builtin >= {"virtio_pci"} and "virtio_net" in k.installed
    assert (linux_caps([k]).block_bus, linux_caps([k]).net_model) == ("virtio", "virtio")


def test_merged_usr_lib_symlink_is_followed_inside_the_guest(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    guest_kernel(tmp_path / "usr")
    (tmp_path / "lib").symlink_to("usr/lib")
    _builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1.0-18-amd64")
    assert "virtio_blk" in installed


def test_guest_symlinks_never_reach_the_host(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "kernel").mkdir(parents=True)
    (host / "kernel" / "host_secret.ko").write_bytes(b"")
    (host / "modules.builtin").write_text("kernel/host_builtin.ko\n")
    guest = tmp_path / "guest"
    base = guest / "lib" / "modules" / "6.1"
    base.mkdir(parents=True)
    # Host-absolute and relative links out of the guest: both resolve inside it,
    # where nothing of the kind exists.
    (base / "modules.builtin").symlink_to(str(host / "modules.builtin"))
    (base / "kernel").symlink_to(str(host / "kernel"))
    (base / "updates").symlink_to("../../../../host/kernel")
    notes: list[str] = []
    builtin, installed = linux_kernel_facts(GuestFS(str(guest)), "6.1", notes)
    assert (builtin, installed) == (frozenset(), frozenset())
    assert any("modules.builtin not read" in n for n in notes)
    assert any("no installed modules" in n for n in notes)


def test_guest_absolute_symlinks_resolve_inside_the_guest(tmp_path: Path) -> None:
    guest_kernel(tmp_path / "opt")
    base = tmp_path / "lib" / "modules"
    base.mkdir(parents=True)
    (base / "6.1.0-18-amd64").symlink_to("/opt/lib/modules/6.1.0-18-amd64")
    builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1.0-18-amd64")
    assert "virtio_pci" in builtin
    assert "virtio_blk" in installed


def test_symlinked_directories_are_not_walked(tmp_path: Path) -> None:
    base = guest_kernel(tmp_path)
    # A loop: walking it would never end without the lstat check.
    (base / "kernel" / "drivers" / "loop").symlink_to("..")
    _builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1.0-18-amd64")
    assert "virtio_blk" in installed


def test_walk_stops_at_the_entry_cap(tmp_path: Path) -> None:
    base = tmp_path / "lib" / "modules" / "6.1" / "kernel"
    base.mkdir(parents=True)
    for i in range(50):
        (base / f"m{i:02d}.ko").write_bytes(b"")
    notes: list[str] = []
    _builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1", notes, max_entries=10)
    assert len(installed) == 10
    assert any("stopped after 10 entries" in n for n in notes)


def test_deep_trees_are_cut_off(tmp_path: Path) -> None:
    deep = tmp_path / "lib" / "modules" / "6.1" / "kernel"
    for i in range(20):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "too_deep.ko").write_bytes(b"")
    notes: list[str] = []
    _builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1", notes)
    assert installed == frozenset()
    assert any("deeper than" in n for n in notes)


@pytest.mark.parametrize("version", ["", "..", "../../etc", "a/b"])
def test_bad_kernel_versions_read_nothing(tmp_path: Path, version: str) -> None:
    notes: list[str] = []
    assert linux_kernel_facts(GuestFS(str(tmp_path)), version, notes) == (
        frozenset(),
        frozenset(),
    )
    assert notes and "not a directory name" in notes[0]


def test_missing_kernel_directory(tmp_path: Path) -> None:
    notes: list[str] = []
    assert linux_kernel_facts(GuestFS(str(tmp_path)), "6.1", notes) == (frozenset(), frozenset())
    assert notes == ["/lib/modules/6.1 not found: no modules for kernel 6.1"]


def test_fifo_modules_builtin_does_not_hang(tmp_path: Path) -> None:
    base = guest_kernel(tmp_path)
    (base / "modules.builtin").unlink()
    os.mkfifo(base / "modules.builtin")
    notes: list[str] = []
    builtin, installed = linux_kernel_facts(GuestFS(str(tmp_path)), "6.1.0-18-amd64", notes)
    assert builtin == frozenset()
    assert "virtio_blk" in installed
    assert any("modules.builtin not read" in n for n in notes)


# --- Windows ------------------------------------------------------------------------


def drivers(*found: WindowsDriver, control_set: str | None = "ControlSet001") -> WindowsDrivers:
    return WindowsDrivers(drivers=found, control_set=control_set)


VIOSTOR = WindowsDriver("viostor", registered=True, start=0, sys_file=True)
VIOSCSI = WindowsDriver("vioscsi", registered=True, start=0, sys_file=True)
NETKVM = WindowsDriver("netkvm", registered=True, start=3, sys_file=True)


def test_viostor_and_netkvm_are_virtio() -> None:
    caps = windows_caps(drivers(VIOSTOR, NETKVM))
    assert (caps.block_bus, caps.net_model, caps.virtio_blk, caps.virtio_net) == (
        "virtio",
        "virtio",
        True,
        True,
    )
    assert caps.reasons == ()
    assert caps.evidence == (
        r"ControlSet001\Services: viostor service Start=0, viostor.sys present",
        r"ControlSet001\Services: vioscsi service not registered",
        r"ControlSet001\Services: netkvm service Start=3, netkvm.sys present",
    )


def test_no_virtio_drivers_is_sata_and_e1000e() -> None:
    caps = windows_caps(drivers())
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")
    assert caps.reasons == (
        r"no boot-start virtio-blk driver (ControlSet001\Services: viostor service not "
        "registered): disks on SATA",
        r"no virtio-net driver (ControlSet001\Services: netkvm service not registered): "
        "NIC is e1000e",
    )


@pytest.mark.parametrize(
    ("viostor", "why"),
    [
        (WindowsDriver("viostor", True, 3, True), "Start=3"),
        (WindowsDriver("viostor", True, None, True), "no Start value"),
        (WindowsDriver("viostor", True, 0, False), "viostor.sys missing"),
        (WindowsDriver("viostor", False, None, True), "not registered"),
    ],
)
def test_viostor_must_be_boot_start_with_its_sys_file(viostor: WindowsDriver, why: str) -> None:
    caps = windows_caps(drivers(viostor, NETKVM))
    assert (caps.block_bus, caps.net_model) == ("sata", "virtio")
    assert len(caps.reasons) == 1
    assert why in caps.reasons[0]


def test_vioscsi_alone_does_not_make_a_virtio_blk_disk() -> None:
    # vioscsi drives virtio-scsi controllers; a virtio-blk disk would stay invisible.
    caps = windows_caps(drivers(VIOSCSI, NETKVM))
    assert caps.block_bus == "sata"
    assert "vioscsi is boot-start but drives virtio-scsi" in caps.reasons[0]


def test_netkvm_needs_its_sys_file() -> None:
    caps = windows_caps(drivers(VIOSTOR, WindowsDriver("netkvm", True, 3, False)))
    assert (caps.block_bus, caps.net_model) == ("virtio", "e1000e")
    assert "netkvm.sys missing" in caps.reasons[0]


def test_unread_system_hive_is_compatibility_mode() -> None:
    facts = WindowsDrivers(notes=("SYSTEM hive is a FIFO, not a regular file: not read",))
    caps = windows_caps(facts)
    assert (caps.block_bus, caps.net_model) == ("sata", "e1000e")
    assert caps.reasons == (
        "virtio drivers unknown (SYSTEM hive is a FIFO, not a regular file: not read): "
        "disks on SATA, NIC is e1000e",
    )


def test_read_failures_are_given_as_reasons() -> None:
    facts = WindowsDrivers(
        drivers=(VIOSTOR,),
        control_set="ControlSet001",
        notes=(r"SYSTEM hive: hivexget timed out",),
    )
    caps = windows_caps(facts)
    assert (caps.block_bus, caps.net_model) == ("virtio", "e1000e")
    assert caps.reasons[-1] == "SYSTEM hive: hivexget timed out"


def test_windows_drivers_round_trip() -> None:
    facts = WindowsDrivers((VIOSTOR, NETKVM), "ControlSet002", ("a note",))
    assert WindowsDrivers.from_dict(facts.to_dict()) == facts
    assert facts.driver("VIOSTOR") == VIOSTOR
    assert facts.driver("vioscsi") == WindowsDriver("vioscsi", False, None, False)
