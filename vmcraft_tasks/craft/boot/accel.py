"""KVM when /dev/kvm can really run a guest, TCG otherwise: tested, not assumed.

A /dev/kvm that opens is not proof: nested or paravirtual KVM (kvm-pvm, for one)
opens fine and then cannot run a stock kernel, and a boot check under it would
fail every guest for the host's fault. So the probe boots a stock kernel straight
under `-accel kvm`, with no disk and no initrd, and watches its serial console: a
kernel that gets as far as looking for its root ("VFS: Cannot open root device",
the "Kernel panic - not syncing: VFS" that follows, or "Run /init") ran on this
KVM. Silence, an emulation failure or qemu exiting without that means it did not.

`kvm_verdict` decides from what the probe saw (pure); `probe_kvm` runs it;
`choose_accel` caches the answer per process, keyed by the kernel and /dev/kvm's
device number.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.atomicfile import atomic_write
from vmcraft_tasks.craft.boot.console import clean
from vmcraft_tasks.craft.boot.qemu import QEMU_BINARY, BootSpec, DirectKernel, qemu_argv

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"
PROBE_TIMEOUT_S = 30.0
PROBE_MEMORY_MIB = 256
# panic=-1 reboots at once on the panic, which -no-reboot turns into qemu's exit.
PROBE_APPEND = "console=ttyS0 panic=-1"
_POLL_S = 0.1
_TIMEOUT_MARGIN_S = 15.0
_TAIL_CHARS = 300

# How far a kernel must get: to looking for its root file system, or starting init.
_PROGRESS = re.compile(
    r"Kernel panic - not syncing: VFS"
    r"|VFS: Cannot open root device"
    r"|VFS: Unable to mount root"
    r"|Run /init as init process"
    r"|Run /\S+ as init process"
)
# What qemu says when KVM cannot run the guest's code.
_KVM_FAILURE = re.compile(
    r"KVM internal error|emulation failure|failed to set MSR|kvm run failed"
    r"|Could not access KVM kernel module|failed to initialize kvm|kvm_init",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AccelProbe:
    usable: bool
    reason: str


def _tail(text: str) -> str:
    lines = [line.strip() for line in clean(text).replace("\r", "\n").splitlines()]
    return " | ".join(line for line in lines if line)[-_TAIL_CHARS:]


def kvm_verdict(console: str, stderr: str, exit_status: int | None) -> AccelProbe:
    """Whether KVM ran the probe kernel, from its console, qemu's stderr and its exit
    status (None: still running when the probe gave up) (pure)."""
    text = clean(console).replace("\r", "\n")
    if match := _PROGRESS.search(text):
        line = text[text.rfind("\n", 0, match.start()) + 1 :].split("\n", 1)[0].strip()
        return AccelProbe(True, f"KVM ran a stock kernel up to: {line}")
    if _KVM_FAILURE.search(stderr):
        return AccelProbe(False, f"KVM could not run a stock kernel: {_tail(stderr)}")
    shown = _tail(console)
    if exit_status is not None:
        said = "; ".join(part for part in (_tail(stderr), shown and f"console: {shown}") if part)
        return AccelProbe(
            False,
            f"qemu -accel kvm exited with status {exit_status} before the kernel "
            f"looked for its root" + (f": {said}" if said else ""),
        )
    if not shown:
        return AccelProbe(False, "a stock kernel under KVM printed nothing (KVM cannot run it)")
    return AccelProbe(False, f"a stock kernel under KVM stopped early; last output: {shown}")


def kvm_device_problem(device: str = KVM_DEVICE) -> str | None:
    """Why `device` cannot be used for KVM at all, or None when it opens read-write."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f"{device} does not exist (no KVM on this host)"
        return f"{device} cannot be opened read-write: {exc.strerror or exc}"
    os.close(fd)
    return None


def probe_kvm(
    kernel: str,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    device: str = KVM_DEVICE,
    qemu_binary: str | None = None,
) -> AccelProbe:
    """Boot the stock kernel `kernel` under KVM and say whether it really ran."""
    if problem := kvm_device_problem(device):
        return AccelProbe(False, problem)
    if not os.path.isfile(kernel):
        return AccelProbe(False, f"no kernel to probe KVM with: {kernel} is not a file")
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as scratch:
        console_path = os.path.join(scratch, "console.log")
        stderr_path = os.path.join(scratch, "qemu.stderr")
        spec = BootSpec(
            disks=(),
            serial_log=console_path,
            memory_mib=PROBE_MEMORY_MIB,
            accel="kvm",
            direct_kernel=DirectKernel(kernel, None, PROBE_APPEND),
            qemu_binary=qemu_binary or QEMU_BINARY,
        )
        Path(console_path).write_bytes(b"")
        # Under `timeout`: a kernel that cannot run on this KVM spins silently forever,
        # and if we die mid-probe (kill -9) nobody else knows to kill it.
        bound = ["timeout", "-s", "KILL", f"{timeout_s + _TIMEOUT_MARGIN_S:g}"]
        proc = commands.spawn_detached([*bound, *qemu_argv(spec)], stderr_path=stderr_path)
        try:
            status = _wait_for_progress(proc, console_path, timeout_s)
        finally:
            commands.kill_session(proc)
        console = Path(console_path).read_text(errors="replace")
        stderr = Path(stderr_path).read_text(errors="replace")
    return kvm_verdict(console, stderr, status)


def _wait_for_progress(proc: subprocess.Popen[bytes], console: str, timeout_s: float) -> int | None:
    """Until the console shows kernel progress, qemu exits (its status) or time is up."""
    deadline = time.monotonic() + timeout_s
    seen = ""
    with open(console, "rb") as log:
        while time.monotonic() < deadline:
            seen = (seen + log.read().decode(errors="replace"))[-64 * 1024 :]
            if _PROGRESS.search(clean(seen)):
                return None
            if (status := _exit_status(proc)) is not None:
                return status
            time.sleep(_POLL_S)
    return None


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    # Not reaped (WNOWAIT): the group id stays ours until kill_session (see run.py).
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_pid == 0:
        return None
    return info.si_status


def _device_number(device: str) -> int | None:
    try:
        return os.stat(device).st_rdev
    except OSError:
        return None


PROBE_FILE = "kvm-probe.json"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def probe_key(rdev: int | None, boot_id: str) -> str:
    """What a probe result holds for (pure): this /dev/kvm, since this host booted."""
    return f"{rdev}:{boot_id}"


def _recorded(cache_dir: str | None, key: str) -> tuple[str, str] | None:
    if cache_dir is None:
        return None
    try:
        with open(os.path.join(cache_dir, PROBE_FILE)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if data.get("key") != key or data.get("accel") not in ("kvm", "tcg"):
        return None
    return str(data["accel"]), f"{data.get('reason', '')} (probed earlier on this host)"


def _record(cache_dir: str | None, key: str, accel: str, reason: str) -> None:
    if cache_dir is None:
        return
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        atomic_write(
            os.path.join(cache_dir, PROBE_FILE),
            json.dumps({"key": key, "accel": accel, "reason": reason}),
            fsync=False,
        )
    except OSError as exc:  # an unwritable cache only costs the next check a probe
        log.warning("could not record the KVM probe in %s: %s", cache_dir, exc)


# (probe key, device, cache dir) -> the choice: the kernel that proved it is not part
# of it, so every later check of the process reuses the first probe.
_chosen: dict[tuple[str, str, str | None], tuple[str, str]] = {}


def choose_accel(
    kernel: str, *, device: str = KVM_DEVICE, cache_dir: str | None = None
) -> tuple[str, str]:
    """("kvm" | "tcg", why): KVM when the probe ran the stock `kernel` on it.

    Whether this host's KVM runs a stock kernel is the host's property, not the
    kernel's: one probe per /dev/kvm device number and host boot, kept in the process
    and, with `cache_dir` (the work dir), for every process of the host.
    """
    key = probe_key(_device_number(device), _boot_id())
    slot = (key, device, cache_dir)
    if slot in _chosen:
        return _chosen[slot]
    chosen = _recorded(cache_dir, key)
    if chosen is None:
        probe = probe_kvm(os.path.abspath(kernel), device=device)
        chosen = ("kvm" if probe.usable else "tcg"), probe.reason
        _record(cache_dir, key, chosen[0], chosen[1])
    _chosen[slot] = chosen
    return chosen


def forget_probes(cache_dir: str | None = None) -> None:
    """Drop every cached probe result (tests, or after the host's KVM changed)."""
    _chosen.clear()
    if cache_dir is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cache_dir, PROBE_FILE))
