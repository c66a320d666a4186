"""Boot-check time per guest: `check_guest` on the real bootable samples, one boot at a time.

    .venv/bin/python -m bench boot_check [--quick]

Each guest boots as it did on VMware (SATA disks, no NIC, the domain the project's
libvirt writer renders for a guest of unknown capabilities) until the console shows a
verdict: BIOS through its own GRUB, the same guest with no serial console configured
(its kernel booted directly), UEFI under OVMF, and the LVM guest over two disks. The
guests alternate round by round. The accelerator is what `accel="auto"` picks on the
host after probing /dev/kvm (on this project's machines: TCG, see README "The boot
check"), so the table says which one it measured; under KVM the same command gives the
KVM figures. Quick mode: one round; full: three.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from bench.common import Series, save, table
from vmcraft_tasks.craft.boot.check import BootCheckResult, check_guest
from vmcraft_tasks.samples import bootable, bootable_lvm, bootable_uefi
from vmcraft_tasks.samples.boot_variants import sata_domain, without_serial_console

Guest = tuple[list[tuple[str, str]], str]  # (disks, domain XML)


def _guests(scratch: str) -> dict[str, Guest]:
    bios = bootable.bootable_debian_bios()
    uefi = bootable_uefi.bootable_debian_uefi()
    lvm = bootable_lvm.bootable_debian_lvm()
    quiet = os.path.join(scratch, "no-serial.qcow2")
    without_serial_console(bios.path, quiet)
    return {
        "BIOS, own GRUB": ([(bios.path, bios.fmt)], sata_domain("bios", 1)),
        "BIOS, no serial console (direct kernel)": ([(quiet, "qcow2")], sata_domain("bios", 1)),
        "UEFI (OVMF), own GRUB": ([(uefi.path, uefi.fmt)], sata_domain("uefi", 1, uefi=True)),
        "LVM over two disks, own GRUB": (
            [(p, lvm.fmt) for p in lvm.paths],
            sata_domain("lvm", len(lvm.paths)),
        ),
    }


def _one(disks: list[tuple[str, str]], domain: str, scratch: str) -> BootCheckResult:
    work = tempfile.mkdtemp(prefix="check-", dir=scratch)
    try:
        return check_guest(disks, domain_xml=domain, work_dir=work, accel="auto")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fmt(s: Series) -> str:
    return f"{s.median:.1f} [{s.low:.1f}-{s.high:.1f}]"


def run(quick: bool = False) -> tuple[str, dict[str, Any]]:
    rounds = 1 if quick else 3
    scratch = tempfile.mkdtemp(prefix="bench-boot-")
    try:
        guests = _guests(scratch)
        series = {name: Series(name) for name in guests}
        last: dict[str, BootCheckResult] = {}
        wall: dict[str, Series] = {name: Series(name) for name in guests}
        for _ in range(rounds):
            for name, (disks, domain) in guests.items():
                started = time.perf_counter()
                result = _one(disks, domain, scratch)
                wall[name].samples.append(time.perf_counter() - started)
                if result.result != "pass":
                    raise RuntimeError(f"{name}: the boot check did not pass: {result.to_dict()}")
                series[name].samples.append(result.seconds)
                last[name] = result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [
        (
            name,
            last[name].firmware,
            last[name].mode,
            last[name].accel,
            last[name].reason,
            _fmt(series[name]),
            _fmt(wall[name]),
        )
        for name in guests
    ]
    text = table(
        f"Boot check per guest, seconds, median [min-max] of {rounds} round(s)",
        ("guest", "firmware", "mode", "accel", "verdict", "to verdict", "whole check"),
        rows,
    )
    text += (
        "\n`to verdict`: qemu's start to the deciding console line; `whole check`: adds "
        "the read-only inspection that picks the mode, the kernel copy of a direct boot "
        "and the first KVM probe of the process.\n"
    )
    data = {
        "rounds": rounds,
        "guests": {
            name: {
                "to_verdict": series[name].to_dict(),
                "whole_check": wall[name].to_dict(),
                "last": last[name].to_dict(),
            }
            for name in guests
        },
    }
    return text, data


if __name__ == "__main__":
    import sys

    out, results = run(quick="--quick" in sys.argv)
    print(out)
    save("boot_check", results)
