"""The final judge of a conversion: the migrated guests boot on KVM's devices.

Both real Debian guests go through the fleet as a user runs it (`vmcraft-tasks run`:
a private redis-server and workers), then each converted disk boots under qemu TCG
with the bus and NIC the domain XML chose, `snapshot=on` so the output is never
written, and must reach a login prompt on the serial console with no failed or
timed-out units. Their unconverted sources fail to boot (test_boot_sources.py).
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
from vmcraft_tasks.craft.boot import BootDisk, BootLimits, BootSpec, Reason, boot_check
from vmcraft_tasks.samples.bootable import BootableImage
from vmcraft_tasks.samples.toolkit import sha256_file

pytestmark = [pytest.mark.boot, pytest.mark.timeout(1800)]

LIMITS = BootLimits(overall_s=420.0, silence_s=150.0, until="login")
NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000e": "e1000e"}


@pytest.fixture(scope="module")
def migrated(
    tmp_path_factory: pytest.TempPathFactory,
    bootable_bios: BootableImage,
    bootable_bios_modules_list: BootableImage,
) -> dict[str, Any]:
    """Both guests migrated by a private fleet; their reports, keyed by VM id."""
    base = tmp_path_factory.mktemp("migrated")
    manifest = base / "wave.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "batch": "boot",
                "vms": [
                    {"id": "deb-fstab", "disks": [bootable_bios.path]},
                    {"id": "deb-modules", "disks": [bootable_bios_modules_list.path]},
                ],
            }
        )
    )
    sources = {p: sha256_file(p) for p in (bootable_bios.path, bootable_bios_modules_list.path)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCRAFT_BROKER")}
    env["VMCRAFT_WORK_DIR"] = str(base / "work")
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "run", str(manifest)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {p: sha256_file(p) for p in sources} == sources, "a source image changed"
    out = base / "boot"
    reports = {
        vm: json.loads((out / f"{vm}.json").read_text()) for vm in ("deb-fstab", "deb-modules")
    }
    return {"dir": out, "reports": reports}


def _domain_devices(xml_path: str) -> tuple[str, str, str]:
    """(disk path, disk bus, NIC model) as the domain XML says."""
    domain = ET.parse(xml_path).getroot()
    disk = domain.find("devices/disk")
    assert disk is not None
    source, target = disk.find("source"), disk.find("target")
    model = domain.find("devices/interface/model")
    assert source is not None and target is not None and model is not None
    return source.attrib["file"], target.attrib["bus"], model.attrib["type"]


@pytest.mark.parametrize("vm", ["deb-fstab", "deb-modules"])
def test_the_migrated_guest_is_done_and_reaches_a_login_prompt_on_virtio(migrated, vm, tmp_path):
    report = migrated["reports"][vm]
    assert report["status"] == "done", report["error"]
    assert report["guestcaps"]["block_bus"] == "virtio"
    (kernel,) = report["initramfs"]["kernels"]
    assert kernel["verified"] and "virtio_blk" in kernel["modules_after"]
    disk, bus, nic = _domain_devices(report["libvirt_xml"])
    assert (bus, nic) == ("virtio", "virtio")
    before = sha256_file(disk)
    spec = BootSpec(
        disks=(BootDisk(disk, "qcow2", "virtio"),),
        serial_log=str(tmp_path / "serial.log"),
        nic_model=NIC_DEVICES[nic],
    )
    snapshot = leaks.snapshot()
    verdict = boot_check(spec, LIMITS)
    print(f"{vm}: {verdict.as_dict()}")
    assert (verdict.result, verdict.reason) == ("pass", Reason.LOGIN_PROMPT), verdict
    console = Path(spec.serial_log or "").read_text(errors="replace")
    assert "Timed out waiting for device" not in console and "[FAILED]" not in console
    assert "emergency" not in console.lower()
    assert sha256_file(disk) == before, "the boot check wrote to the output disk"
    assert not leaks.snapshot().new_since(snapshot)
