"""Guest capabilities ("guestcaps", as virt-v2v calls them): which devices the guest can drive.

The KVM domain's disk bus and NIC model follow from what the converted guest can
boot with, never from its OS name. A Linux without virtio_blk in its initramfs
cannot find its root disk on a virtio disk, just as a Windows without a boot-start
viostor stops with INACCESSIBLE_BOOT_DEVICE. So virtio is chosen only when the
drivers were seen; anything else gets the emulated devices every guest has drivers
for (SATA/AHCI disks, an e1000e NIC), and `reasons` says why, so the domain boots
and the reader of its XML knows what to install to move it to virtio later.

Deriving caps is pure (`linux_caps`, `windows_caps`: facts in, GuestCaps out).
Reading the facts is `linux_kernel_facts` here (kernel modules on disk) and
`inspect.windows.windows_driver_facts` (the SYSTEM hive); the initramfs module list
comes from `fixes.initramfs_regen.initramfs_modules`, which callers pass in.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from vmcraft_tasks.craft.errors import GuestPathError
from vmcraft_tasks.craft.guestpath import GuestFS

log = logging.getLogger(__name__)

BlockBus = Literal["virtio", "sata"]
NetModel = Literal["virtio", "e1000e"]

CAPS_UNKNOWN_REASON = (
    "guest capabilities unknown (inspection recorded no virtio drivers): "
    "disks on SATA, NIC is e1000e"
)

# Kernel module names as modprobe spells them ('_', never '-').
VIRTIO_BLK = "virtio_blk"
VIRTIO_PCI = "virtio_pci"
VIRTIO_NET = "virtio_net"
# virtio_pci is the transport of every virtio PCI device: without it neither
# virtio_blk nor virtio_net ever sees its device.
LINUX_BLOCK_MODULES = (VIRTIO_BLK, VIRTIO_PCI)
LINUX_NET_MODULES = (VIRTIO_NET, VIRTIO_PCI)

# Windows service names, which are also the base names of the drivers' .sys files.
VIOSTOR = "viostor"  # virtio-blk
VIOSCSI = "vioscsi"  # virtio-scsi
NETKVM = "netkvm"  # virtio-net
WINDOWS_VIRTIO_SERVICES = (VIOSTOR, VIOSCSI, NETKVM)
# SERVICE_BOOT_START: loaded by winload with the kernel. A storage driver that starts
# any later cannot be the one that reads the boot disk.
BOOT_START = 0

# Longest first, so "x.ko.xz" does not match ".ko" halfway.
MODULE_SUFFIXES = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")
# Where depmod looks for a kernel's modules (weak-updates only links to other kernels').
MODULE_DIRS = ("kernel", "updates", "extra")
# A distribution kernel has about 6,000 module files in some 600 directories, at most
# 7 levels down; the caps only stop a hostile or corrupt tree from taking forever.
MAX_MODULE_ENTRIES = 100_000
MAX_MODULE_DEPTH = 16
MODULES_BUILTIN_CAP = 4 * 1024 * 1024


# --- the record --------------------------------------------------------------------


@dataclass(frozen=True)
class GuestCaps:
    """How the guest's disks and NICs are presented to it, and why.

    `virtio_blk` / `virtio_net` say whether the guest was seen to have the drivers;
    `block_bus` / `net_model` are the choices made from that. `reasons` explain every
    compatibility-mode choice (there is at least one whenever one is made);
    `evidence` lists what was found, whichever way the choice went.
    """

    block_bus: BlockBus
    net_model: NetModel
    virtio_blk: bool
    virtio_net: bool
    reasons: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block_bus not in get_args(BlockBus):
            raise ValueError(f"guestcaps: bad block bus {self.block_bus!r}")
        if self.net_model not in get_args(NetModel):
            raise ValueError(f"guestcaps: bad net model {self.net_model!r}")
        # virtio without the driver is exactly the unbootable domain this record exists
        # to prevent, so it cannot even be constructed.
        if self.block_bus == "virtio" and not self.virtio_blk:
            raise ValueError("guestcaps: virtio block bus without a virtio_blk driver")
        if self.net_model == "virtio" and not self.virtio_net:
            raise ValueError("guestcaps: virtio NIC without a virtio_net driver")
        if self.compatibility_mode and not self.reasons:
            raise ValueError("guestcaps: a compatibility-mode choice needs a reason")

    @property
    def compatibility_mode(self) -> bool:
        """True if the disks or the NICs are emulated rather than virtio."""
        return self.block_bus != "virtio" or self.net_model != "virtio"

    @classmethod
    def compatibility(cls, *reasons: str, evidence: Iterable[str] = ()) -> GuestCaps:
        """SATA and e1000e for a guest whose drivers are unknown, with why."""
        return cls("sata", "e1000e", False, False, tuple(reasons), tuple(evidence))

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_bus": self.block_bus,
            "net_model": self.net_model,
            "virtio_blk": self.virtio_blk,
            "virtio_net": self.virtio_net,
            "reasons": list(self.reasons),
            "evidence": list(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuestCaps:
        """The inverse of `to_dict`; ValueError for anything that is not one."""
        return cls(
            block_bus=_choice(data, "block_bus", get_args(BlockBus)),
            net_model=_choice(data, "net_model", get_args(NetModel)),
            virtio_blk=_bool(data, "virtio_blk"),
            virtio_net=_bool(data, "virtio_net"),
            reasons=_strings(data, "reasons"),
            evidence=_strings(data, "evidence"),
        )


CAPS_UNKNOWN = GuestCaps.compatibility(CAPS_UNKNOWN_REASON)


def caps_or_unknown(data: Mapping[str, Any] | None) -> GuestCaps:
    """The caps a report recorded (`GuestCaps.to_dict()`), or compatibility mode.

    A missing or unreadable record falls back to devices every guest can boot with,
    and the reason says so, rather than failing a migration that is otherwise done.
    """
    if data is None:
        return CAPS_UNKNOWN
    try:
        return GuestCaps.from_dict(data)
    except (ValueError, TypeError, AttributeError) as exc:
        return GuestCaps.compatibility(
            f"recorded guest capabilities unreadable ({exc}): disks on SATA, NIC is e1000e"
        )


def unknown_os_caps(os_type: str | None) -> GuestCaps:
    """Compatibility mode for a root that inspection could not identify (or no root)."""
    if os_type is None:
        what = "no operating system found"
    else:
        what = f"operating system type {os_type!r} has no driver inspection"
    return GuestCaps.compatibility(f"{what}: disks on SATA, NIC is e1000e")


def _choice(data: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> Any:
    value = data.get(key)
    if value not in allowed:
        raise ValueError(f"guestcaps: {key} must be one of {allowed}, not {value!r}")
    return value


def _bool(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"guestcaps: {key} must be true or false, not {value!r}")
    return value


def _strings(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"guestcaps: {key} must be a list of strings")
    return tuple(value)


def _decide(
    block_gaps: Sequence[str], net_gaps: Sequence[str], evidence: Iterable[str]
) -> GuestCaps:
    """virtio for whatever has no gap; every gap becomes the reason of its fallback."""
    reasons = [f"{gap}: disks on SATA" for gap in block_gaps]
    reasons += [f"{gap}: NIC is e1000e" for gap in net_gaps]
    return GuestCaps(
        block_bus="sata" if block_gaps else "virtio",
        net_model="e1000e" if net_gaps else "virtio",
        virtio_blk=not block_gaps,
        virtio_net=not net_gaps,
        reasons=tuple(reasons),
        evidence=tuple(evidence),
    )


# --- Linux -------------------------------------------------------------------------


def module_name(file_name: str) -> str | None:
    """The module a kernel module file provides (`.../virtio-blk.ko.xz` -> virtio_blk)."""
    base = file_name.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base.removesuffix(suffix).replace("-", "_")
    return None


def normalise_module(name: str) -> str:
    """A module name as modprobe compares it, from a bare name or a module file path."""
    return module_name(name) or name.rsplit("/", 1)[-1].replace("-", "_")


def _normalised(names: Iterable[str]) -> frozenset[str]:
    return frozenset(normalise_module(name) for name in names)


@dataclass(frozen=True)
class KernelDrivers:
    """What one bootable kernel of the guest can load, and when.

    `initramfs_modules` None means the initramfs could not be read: then only
    built-in drivers count for the boot disk. Names are normalised on construction.
    """

    version: str
    initramfs_modules: frozenset[str] | None
    builtin: frozenset[str] = frozenset()
    installed: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # frozen: normalising in place needs object.__setattr__.
        if self.initramfs_modules is not None:
            object.__setattr__(self, "initramfs_modules", _normalised(self.initramfs_modules))
        object.__setattr__(self, "builtin", _normalised(self.builtin))
        object.__setattr__(self, "installed", _normalised(self.installed))
        object.__setattr__(self, "notes", tuple(self.notes))

    def where(self, module: str) -> str:
        """Where `module` was found, for evidence: built in, initramfs, installed, absent."""
        if module in self.builtin:
            return "built in"
        if self.initramfs_modules is not None and module in self.initramfs_modules:
            return "in initramfs"
        if module in self.installed:
            return "installed"
        return "absent"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "initramfs_modules": None
            if self.initramfs_modules is None
            else sorted(self.initramfs_modules),
            "builtin": sorted(self.builtin),
            "installed": sorted(self.installed),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelDrivers:
        initramfs = data.get("initramfs_modules")
        return cls(
            version=str(data["version"]),
            initramfs_modules=None if initramfs is None else frozenset(initramfs),
            builtin=frozenset(data.get("builtin", ())),
            installed=frozenset(data.get("installed", ())),
            notes=tuple(data.get("notes", ())),
        )


def _linux_block_gap(kernel: KernelDrivers) -> str | None:
    # The root disk must be readable before the root filesystem is mounted: only the
    # initramfs and the kernel image itself are there at that point.
    at_boot = kernel.builtin | (kernel.initramfs_modules or frozenset())
    missing = [m for m in LINUX_BLOCK_MODULES if m not in at_boot]
    if not missing:
        return None
    names = ", ".join(missing)
    if kernel.initramfs_modules is None:
        return f"kernel {kernel.version}: initramfs unreadable and {names} not built in"
    return f"kernel {kernel.version}: {names} neither in its initramfs nor built in"


def _linux_net_gap(kernel: KernelDrivers) -> str | None:
    # A NIC driver loads from the root filesystem after boot: installed is enough.
    loadable = kernel.builtin | kernel.installed | (kernel.initramfs_modules or frozenset())
    missing = [m for m in LINUX_NET_MODULES if m not in loadable]
    if not missing:
        return None
    return f"kernel {kernel.version}: {', '.join(missing)} neither installed nor built in"


def _linux_evidence(kernel: KernelDrivers) -> list[str]:
    found = ", ".join(f"{m} {kernel.where(m)}" for m in (VIRTIO_BLK, VIRTIO_PCI, VIRTIO_NET))
    return [f"kernel {kernel.version}: {found}", *kernel.notes]


def linux_caps(kernels: Sequence[KernelDrivers]) -> GuestCaps:
    """Caps of a Linux guest from the drivers of each of its bootable kernels.

    The bootloader may start any of them (a default that changes, a fallback entry),
    so virtio is chosen only when every kernel has the driver: one kernel without
    it is enough for a guest that fails to boot or comes up without a network.
    """
    if not kernels:
        return GuestCaps.compatibility(
            "no bootable kernel found, virtio drivers unconfirmed: disks on SATA, NIC is e1000e"
        )
    block_gaps = [gap for k in kernels if (gap := _linux_block_gap(k))]
    net_gaps = [gap for k in kernels if (gap := _linux_net_gap(k))]
    evidence = [line for k in kernels for line in _linux_evidence(k)]
    return _decide(block_gaps, net_gaps, evidence)


def _bad_kernel_version(kernel: str) -> bool:
    # The version comes from guest file names; one with a '/' would walk elsewhere.
    return not kernel or "/" in kernel or "\0" in kernel or kernel in (".", "..")


def _read_builtin(fs: GuestFS, base: str, notes: list[str]) -> frozenset[str]:
    path = f"{base}/modules.builtin"
    try:
        text = fs.cat(path, max_size=MODULES_BUILTIN_CAP)
    except GuestPathError as exc:
        # Kernels before 2.6.33 have no modules.builtin: built-in drivers are unknown.
        notes.append(f"{path} not read ({exc.reason}): built-in drivers unknown")
        return frozenset()
    return frozenset(name for line in text.splitlines() if (name := module_name(line.strip())))


def _is_real_dir(fs: GuestFS, path: str) -> bool:
    # lstat, not is_dir: a symlinked directory is not descended, so a link back up
    # the tree cannot make the walk loop.
    try:
        return stat.S_ISDIR(fs.lstat(path).st_mode)
    except GuestPathError:
        return False


@dataclass
class _ModuleWalk:
    """An iterative, bounded walk over module directories collecting module names."""

    fs: GuestFS
    max_entries: int
    notes: list[str]
    names: set[str] = field(default_factory=set)
    seen: int = 0
    too_deep: bool = False

    def run(self, tops: Sequence[str]) -> bool:
        """Walk `tops`; False if the entry cap stopped the walk early."""
        stack = [(top, 0) for top in reversed(tops)]
        while stack:
            directory, depth = stack.pop()
            subdirs = self._scan(directory, depth)
            if subdirs is None:
                return False
            stack.extend((sub, depth + 1) for sub in reversed(subdirs))
        return True

    def _scan(self, directory: str, depth: int) -> list[str] | None:
        """Record the modules in `directory`; its subdirectories, or None at the cap."""
        try:
            entries = self.fs.ls(directory)
        except GuestPathError as exc:
            self.notes.append(f"{directory} not listed: {exc.reason}")
            return []
        subdirs: list[str] = []
        for entry in entries:
            self.seen += 1
            if self.seen > self.max_entries:
                return None
            name = module_name(entry)
            if name is not None:
                # By name alone: no stat per module file keeps the walk cheap.
                self.names.add(name)
            elif _is_real_dir(self.fs, f"{directory}/{entry}"):
                if depth + 1 >= MAX_MODULE_DEPTH:
                    self.too_deep = True
                else:
                    subdirs.append(f"{directory}/{entry}")
        return subdirs


def _read_installed(fs: GuestFS, base: str, notes: list[str], max_entries: int) -> frozenset[str]:
    tops = [f"{base}/{d}" for d in MODULE_DIRS if fs.is_dir(f"{base}/{d}")]
    if not tops:
        notes.append(f"{base}/kernel not found: no installed modules")
        return frozenset()
    walk = _ModuleWalk(fs, max_entries, notes)
    if not walk.run(tops):
        notes.append(
            f"{base}: module walk stopped after {max_entries} entries, "
            "installed modules may be incomplete"
        )
        log.warning("module walk of %s hit the %d-entry cap", base, max_entries)
    if walk.too_deep:
        notes.append(f"{base}: directories deeper than {MAX_MODULE_DEPTH} levels not walked")
    return frozenset(walk.names)


def linux_kernel_facts(
    fs: GuestFS,
    kernel: str,
    notes: list[str] | None = None,
    *,
    max_entries: int = MAX_MODULE_ENTRIES,
) -> tuple[frozenset[str], frozenset[str]]:
    """(built-in, installed) module names of kernel `kernel` in the guest at `fs`.

    Built-in from /lib/modules/K/modules.builtin; installed from the module files
    under /lib/modules/K/{kernel,updates,extra}. All reads go through `fs`, so guest
    symlinks resolve inside the guest. What could not be read, or a walk cut short
    at `max_entries`, is appended to `notes`.
    """
    notes = notes if notes is not None else []
    if _bad_kernel_version(kernel):
        notes.append(f"kernel version {kernel!r} is not a directory name: modules not read")
        return frozenset(), frozenset()
    base = f"/lib/modules/{kernel}"
    if not fs.is_dir(base):
        notes.append(f"{base} not found: no modules for kernel {kernel}")
        return frozenset(), frozenset()
    return _read_builtin(fs, base, notes), _read_installed(fs, base, notes, max_entries)


def kernel_drivers(
    fs: GuestFS, kernel: str, initramfs_modules: frozenset[str] | None
) -> KernelDrivers:
    """One kernel's `KernelDrivers`: its module facts read from `fs`, its initramfs given."""
    notes: list[str] = []
    builtin, installed = linux_kernel_facts(fs, kernel, notes)
    return KernelDrivers(kernel, initramfs_modules, builtin, installed, tuple(notes))


# --- Windows -----------------------------------------------------------------------


@dataclass(frozen=True)
class WindowsDriver:
    """One virtio-win driver as the SYSTEM hive and System32\\drivers show it."""

    service: str  # lower case: viostor, vioscsi, netkvm
    registered: bool  # Services\<service> exists in the control set read
    start: int | None  # its Start value; None when unregistered or not a DWORD
    sys_file: bool  # System32\drivers\<service>.sys is a regular file

    @property
    def boot_start(self) -> bool:
        return self.registered and self.start == BOOT_START and self.sys_file

    def describe(self) -> str:
        if not self.registered:
            return f"{self.service} service not registered"
        start = "no Start value" if self.start is None else f"Start={self.start}"
        sys_file = "present" if self.sys_file else "missing"
        return f"{self.service} service {start}, {self.service}.sys {sys_file}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "registered": self.registered,
            "start": self.start,
            "sys_file": self.sys_file,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowsDriver:
        start = data.get("start")
        return cls(
            service=str(data["service"]).lower(),
            registered=bool(data.get("registered")),
            start=start if isinstance(start, int) else None,
            sys_file=bool(data.get("sys_file")),
        )


@dataclass(frozen=True)
class WindowsDrivers:
    """The virtio-win driver facts of a Windows guest.

    `control_set` names the control set read (ControlSet001, ...); None means the
    SYSTEM hive was not read at all, and `notes` says why.
    """

    drivers: tuple[WindowsDriver, ...] = ()
    control_set: str | None = None
    notes: tuple[str, ...] = ()

    def driver(self, service: str) -> WindowsDriver:
        """The facts for `service`; a service nobody looked at counts as not installed."""
        wanted = service.lower()
        found = next((d for d in self.drivers if d.service == wanted), None)
        return found or WindowsDriver(wanted, registered=False, start=None, sys_file=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drivers": [d.to_dict() for d in self.drivers],
            "control_set": self.control_set,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowsDrivers:
        control_set = data.get("control_set")
        return cls(
            drivers=tuple(WindowsDriver.from_dict(d) for d in data.get("drivers", ())),
            control_set=None if control_set is None else str(control_set),
            notes=tuple(data.get("notes", ())),
        )


def _windows_block_gap(drivers: WindowsDrivers, key: str) -> str | None:
    viostor, vioscsi = drivers.driver(VIOSTOR), drivers.driver(VIOSCSI)
    if viostor.boot_start:
        return None
    gap = f"no boot-start virtio-blk driver ({key}: {viostor.describe()})"
    if vioscsi.boot_start:
        # vioscsi drives virtio-scsi controllers, not virtio-blk disks: counting it
        # would give a guest that cannot see its disk on a virtio bus.
        gap += "; vioscsi is boot-start but drives virtio-scsi, which is not generated"
    return gap


def _windows_net_gap(drivers: WindowsDrivers, key: str) -> str | None:
    netkvm = drivers.driver(NETKVM)
    # No Start check: NetKVM is demand-start (3) by design, Plug and Play loads it.
    if netkvm.registered and netkvm.sys_file:
        return None
    return f"no virtio-net driver ({key}: {netkvm.describe()})"


def windows_caps(drivers: WindowsDrivers) -> GuestCaps:
    """Caps of a Windows guest from its virtio-win drivers.

    virtio-blk needs viostor registered as a boot-start service with its .sys file
    present; virtio-net needs the netkvm service and netkvm.sys. Anything less is
    SATA and e1000e, for which Windows 8 / Server 2012 and later have inbox drivers.
    """
    if drivers.control_set is None:
        why = "; ".join(drivers.notes) or "SYSTEM hive not read"
        return GuestCaps.compatibility(
            f"virtio drivers unknown ({why}): disks on SATA, NIC is e1000e"
        )
    key = rf"{drivers.control_set}\Services"
    block_gaps = [gap] if (gap := _windows_block_gap(drivers, key)) else []
    net_gaps = [gap] if (gap := _windows_net_gap(drivers, key)) else []
    evidence = [f"{key}: {drivers.driver(name).describe()}" for name in WINDOWS_VIRTIO_SERVICES]
    caps = _decide(block_gaps, net_gaps, [*evidence, *drivers.notes])
    if caps.compatibility_mode and drivers.notes:
        # A service whose key could not be read looks "not registered": the note
        # saying why belongs with the reasons, not only with the evidence.
        return replace(caps, reasons=caps.reasons + drivers.notes)
    return caps
