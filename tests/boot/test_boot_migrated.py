"""The final judge of a conversion, as a fleet step: `options.boot_check` boots every
migrated VM headless under qemu (TCG here: /dev/kvm cannot run a stock kernel on these
machines) with the firmware, machine, disk bus and NIC its domain XML says, every disk
`snapshot=on`, no network, and the VM is `done` only when the console shows it up.

The real Debian guests go through `vmcraft-tasks run` as a user runs it:
- the two classic migration problems, fixed: both pass on virtio;
- the UEFI guest (ESP on vfat, GRUB at the fallback path): passes under OVMF;
- the same guest with `fixes: false`: the tool does not rewrite it, so the domain keeps
  it on SATA (compatibility mode), where it boots as it did on VMware: it passes;
- a guest whose fstab names a filesystem that no longer exists (a stale UUID, which no
  offline check can prove wrong): the tool calls it ready, the boot check does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import leaks
from vmcraft_tasks.craft.guestpath import GuestFS
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.bootable import BootableImage
from vmcraft_tasks.samples.bootable_uefi import UefiBootableImage
from vmcraft_tasks.samples.toolkit import sha256_file

pytestmark = [pytest.mark.boot, pytest.mark.timeout(2400)]

STALE_UUID = "0badc0de-0000-4000-8000-00000000d474"
VMS = ("deb-fstab", "deb-modules", "deb-uefi", "deb-nofix", "deb-stale")


def _stale_copy(source: str, directory: Path) -> str:
    """A raw copy of the guest whose fstab also mounts a filesystem that is gone."""
    copy = directory / "stale.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", source, str(copy)], check=True, timeout=300)
    with VMCraft(str(copy), readonly=False) as g:
        (root,) = g.inspect_os()
        fs: GuestFS = g.guest(root)
        fstab = fs.cat("/etc/fstab")
        entry = f"UUID={STALE_UUID} /srv/data ext4 defaults 0 2\n"
        fs.write_file("/etc/fstab", (fstab + entry).encode())
    return str(copy)


@pytest.fixture(scope="module")
def migrated(
    tmp_path_factory: pytest.TempPathFactory,
    bootable_bios: BootableImage,
    bootable_bios_modules_list: BootableImage,
    bootable_uefi: UefiBootableImage,
) -> dict[str, Any]:
    """The guests migrated and boot-checked by a private one-host fleet (one boot at a
    time); their reports, keyed by VM id."""
    base = tmp_path_factory.mktemp("migrated")
    stale = _stale_copy(bootable_bios.path, base)
    manifest = base / "wave.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "batch": "boot",
                "defaults": {"options": {"boot_check": True}},
                "vms": [
                    {"id": "deb-fstab", "disks": [bootable_bios.path]},
                    {"id": "deb-modules", "disks": [bootable_bios_modules_list.path]},
                    {"id": "deb-uefi", "disks": [bootable_uefi.path]},
                    {
                        "id": "deb-nofix",
                        "disks": [bootable_bios.path],
                        "options": {"fixes": False},
                    },
                    {"id": "deb-stale", "disks": [stale]},
                ],
            }
        )
    )
    sources = {
        p: sha256_file(p)
        for p in (bootable_bios.path, bootable_bios_modules_list.path, bootable_uefi.path)
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCRAFT_BROKER")}
    env["VMCRAFT_WORK_DIR"] = str(base / "work")
    before = leaks.snapshot()
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "run", "--hosts", "1", str(manifest)],
        capture_output=True,
        text=True,
        timeout=2000,
        env=env,
        check=False,
    )
    # 1: some VM failed (the stale one must); anything else is a broken run.
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {p: sha256_file(p) for p in sources} == sources, "a source image changed"
    assert not leaks.snapshot().new_since(before), "the run left something behind"
    out = base / "boot"
    reports = {vm: json.loads((out / f"{vm}.json").read_text()) for vm in VMS}
    return {"dir": out, "reports": reports, "work": base / "work"}


def _domain(xml_path: str) -> tuple[list[tuple[str, str]], str]:
    """([(disk path, bus)], NIC model) as the domain XML says."""
    domain = ET.parse(xml_path).getroot()
    disks = []
    for disk in domain.findall("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        assert source is not None and target is not None
        disks.append((source.attrib["file"], target.attrib["bus"]))
    model = domain.find("devices/interface/model")
    assert model is not None
    return disks, model.attrib["type"]


def _check_kept_log(migrated: dict[str, Any], vm: str, check: dict[str, Any]) -> str:
    log = Path(check["serial_log"])
    assert log == migrated["dir"] / f"{vm}.serial.log"
    text = log.read_text()
    assert "\x1b" not in text and "\r" not in text  # ANSI and CR noise stripped
    return text


@pytest.mark.parametrize("vm", ["deb-fstab", "deb-modules"])
def test_the_fixed_guests_pass_their_boot_check_on_virtio(migrated, vm):
    report = migrated["reports"][vm]
    assert report["status"] == "done", report["error"]
    check = report["boot_check"]
    # Up: systemd reached its default target (or a login prompt came first).
    assert check["result"] == "pass", check
    assert check["reason"] in ("default-target", "login-prompt"), check
    assert (check["mode"], check["firmware"], check["accel"]) == ("bootloader", "bios", "tcg")
    # Not assumed: KVM was probed (here it runs no stock kernel, so TCG it is).
    (accel_note,) = [n for n in check["notes"] if n.startswith("accel ")]
    assert accel_note.startswith("accel TCG: ") and "probed" in accel_note, accel_note
    assert any("multi-user.target" in line or "login:" in line for line in check["evidence"])
    assert 0 < check["seconds"] < 600
    disks, nic = _domain(report["libvirt_xml"])
    assert [bus for _, bus in disks] == ["virtio"] and nic == "virtio"
    text = _check_kept_log(migrated, vm, check)
    assert "Timed out waiting for device" not in text and "[FAILED]" not in text
    summary = (migrated["dir"] / "summary.md").read_text()
    assert f"| {vm} | done |" in summary and "pass " in summary


def test_the_uefi_guest_boots_under_ovmf_on_virtio(migrated):
    report = migrated["reports"]["deb-uefi"]
    assert report["status"] == "done", report["error"]
    check = report["boot_check"]
    assert (check["result"], check["firmware"], check["mode"]) == ("pass", "uefi", "bootloader")
    text = _check_kept_log(migrated, "deb-uefi", check)
    assert "boot-efi.mount" in text and "[FAILED]" not in text
    disks, _nic = _domain(report["libvirt_xml"])
    assert [bus for _, bus in disks] == ["virtio"]


def test_an_unfixed_guest_is_kept_on_sata_and_boots_there(migrated):
    report = migrated["reports"]["deb-nofix"]
    assert report["status"] == "done", report["error"]
    disks, _nic = _domain(report["libvirt_xml"])
    assert [bus for _, bus in disks] == ["sata"]
    assert report["boot_check"]["result"] == "pass", report["boot_check"]


def test_a_stale_fstab_entry_fails_the_vm_with_the_console_evidence(migrated):
    report = migrated["reports"]["deb-stale"]
    check = report["boot_check"]
    assert report["status"] == "failed" and check["result"] == "fail", check
    assert check["reason"] in ("emergency-mode", "failed-units"), check
    evidence = " ".join(check["evidence"])
    assert "Timed out waiting for device" in evidence or "emergency" in evidence.lower()
    assert report["error"].startswith("boot check failed (")
    assert check["evidence"][-1] in report["error"]
    text = _check_kept_log(migrated, "deb-stale", check)
    assert STALE_UUID.split("-", maxsplit=1)[0] in text or "srv-data" in text


def test_nothing_of_a_boot_check_is_left_on_the_host(migrated):
    host_dir = migrated["work"]
    leftovers = [
        p for p in host_dir.rglob("*") if p.name.startswith("boot-") or "bootchecks" in p.parts
    ]
    assert not [p for p in leftovers if p.is_file() and p.suffix == ".json"], leftovers


def test_the_check_does_not_write_the_output_disk(migrated, tmp_path):
    """`vmcraft boot-check` on a migrated output (the library alone, no fleet): it
    passes, and the disk's checksum is the same before and after."""
    report = migrated["reports"]["deb-fstab"]
    disks, _nic = _domain(report["libvirt_xml"])
    (disk, _bus) = disks[0]
    before = sha256_file(disk)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmcraft_tasks.craft.cli",
            "boot-check",
            "--json",
            # The probe is the fleet's (the run above): TCG as asked here.
            "--accel",
            "tcg",
            "--domain",
            report["libvirt_xml"],
            disk,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(proc.stdout)["result"] == "pass"
    assert sha256_file(disk) == before, "the boot check wrote to the output disk"
