"""`render_domain`: a DomainSpec as libvirt domain XML, in one fixed element order.

The order is that of `virsh dumpxml`, so a rendered file and the defined domain
diff cleanly. Every piece is a small function of the spec; none looks at the guest
OS or its capabilities (that is `defaults.py`'s job).
"""

from __future__ import annotations

import uuid
from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.devices import devices_element
from vmcraft_tasks.craft.libvirt.elements import el, to_string
from vmcraft_tasks.craft.libvirt.metadata import metadata_element
from vmcraft_tasks.craft.libvirt.spec import DomainSpec

# Fixed forever: every domain's UUID is uuid5(this, name). Changing it would give
# every already-rendered VM a new identity on the next render.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vmcraft-tasks:libvirt-domain")

# Windows' spinlock retry count before it notifies the hypervisor; 8191 is what
# virt-install and Hyper-V itself use.
HYPERV_SPINLOCK_RETRIES = 8191


def domain_uuid(name: str) -> str:
    """A stable UUID for a domain name, so re-rendering the same VM gives the same XML."""
    return str(uuid.uuid5(UUID_NAMESPACE, name))


def _memory(spec: DomainSpec) -> list[ET.Element]:
    # KiB, libvirt's native unit: what dumpxml prints, whatever unit was given.
    return [
        el("memory", {"unit": "KiB"}, text=str(spec.memory_kib)),
        el("currentMemory", {"unit": "KiB"}, text=str(spec.memory_kib)),
    ]


def _os(spec: DomainSpec) -> ET.Element:
    return el(
        "os",
        # firmware="efi" lets libvirt pick the host's OVMF build and create the
        # per-domain NVRAM, instead of hard-coding distribution-specific paths.
        {"firmware": "efi" if spec.uefi else None},
        el("type", {"arch": spec.arch, "machine": spec.machine}, text="hvm"),
        # The source's Secure Boot state is not visible in its disks, and a Linux
        # guest's bootloader may be unsigned: ask for firmware without Secure Boot.
        el("firmware", None, el("feature", {"enabled": "no", "name": "secure-boot"}))
        if spec.uefi
        else None,
        el("boot", {"dev": "hd"}),
    )


def _hyperv() -> ET.Element:
    return el(
        "hyperv",
        None,
        el("relaxed", {"state": "on"}),
        el("vapic", {"state": "on"}),
        el("spinlocks", {"state": "on", "retries": HYPERV_SPINLOCK_RETRIES}),
    )


def _features(spec: DomainSpec) -> ET.Element:
    return el(
        "features",
        None,
        el("acpi"),  # without ACPI, `virsh shutdown` cannot ask the guest to power off
        el("apic"),
        _hyperv() if spec.hyperv else None,
        # vmport emulates VMware's backdoor port, only useful with VMware tools: off,
        # so guests that came from VMware don't keep talking to a device that lies.
        el("vmport", {"state": "off"}),
        # SMM is what protects UEFI variables on q35; OVMF builds with Secure Boot
        # refuse to start without it, so it is on whenever UEFI is, in case a host
        # only has such builds or Secure Boot is switched on later.
        el("smm", {"state": "on"}) if spec.uefi else None,
    )


def _clock(spec: DomainSpec) -> ET.Element:
    return el(
        "clock",
        {"offset": spec.clock_offset},
        # Catch up on missed RTC ticks and delay PIT ones: guest time stays right
        # after the host was busy; no HPET, which is slow and drifts under KVM.
        el("timer", {"name": "rtc", "tickpolicy": "catchup"}),
        el("timer", {"name": "pit", "tickpolicy": "delay"}),
        el("timer", {"name": "hpet", "present": "no"}),
        el("timer", {"name": "hypervclock", "present": "yes"}) if spec.hyperv else None,
    )


def domain_element(spec: DomainSpec) -> ET.Element:
    """The <domain> element tree for `spec`."""
    return el(
        "domain",
        {"type": "kvm"},
        el("name", text=spec.name),
        el("uuid", text=domain_uuid(spec.name)),
        metadata_element(spec),
        _memory(spec),
        el("vcpu", {"placement": "static"}, text=str(spec.vcpus)),
        _os(spec),
        _features(spec),
        # The conversion target is a known KVM host; passthrough gives the guest
        # every CPU feature it had on the source (live migration between unlike
        # hosts is not a goal of a freshly converted VM).
        el("cpu", {"mode": "host-passthrough", "check": "none"}),
        _clock(spec),
        el("on_poweroff", text="destroy"),
        el("on_reboot", text="restart"),
        el("on_crash", text="destroy"),
        # Guest suspend-to-RAM/disk under KVM tends to hang the guest: refuse it.
        el(
            "pm",
            None,
            el("suspend-to-mem", {"enabled": "no"}),
            el("suspend-to-disk", {"enabled": "no"}),
        ),
        devices_element(spec),
    )


def render_domain(spec: DomainSpec) -> str:
    """`spec` as libvirt domain XML text (indented, newline-terminated, no declaration)."""
    return to_string(domain_element(spec))
