"""Expose an LV as a readable block device, without device-mapper.

- A single-segment linear LV is a loop device over its bytes on its PV:
  offset `pv offset + pe_start + pv_start_extent * extent_size`, sizelimit the LV size
  (`expose_loop`).
- An LV of several segments, or on several PVs, goes through a userspace NBD server
  that maps the segments: nbdkit running `segment_plugin.py` on a private unix socket,
  nbdfuse exposing it as a file, and a loop device on that file (`expose_nbd`).
- `expose` picks one of the two. Both are read-only unless `writable=True`.

Whatever starts is recorded in the LV's private state directory
(`<parent>/lvm-<hash of vg and lv uuids>/lvm-resources.json`) the moment it exists, as the
FUSE attach backend does, so `release(state_dir)` (or `release_all(parent)`, what a
restarted worker calls on an attach directory) undoes exactly that, by id: each
loop device is detached only while it still points at our backing file, each helper
is signalled only while its command line still names our socket.

The kernel path (`dm_table`, `dm_name`, `dm_create`) writes a device-mapper linear
table instead, for hosts whose kernel has device-mapper. This project's machines have
none: the table and the name are unit-tested, `dm_create` is not run here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmcraft_tasks.craft import atomicfile, commands, mountinfo
from vmcraft_tasks.craft.errors import VMCraftError
from vmcraft_tasks.craft.lvm.layout import LV, VG
from vmcraft_tasks.craft.nbd import helpers, loopdev

SECTOR = 512
RESOURCES_FILE = "lvm-resources.json"
STATE_PREFIX = "lvm-"
PLUGIN = str(Path(__file__).with_name("segment_plugin.py"))
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
DM_NAME_MAX = 127  # DM_NAME_LEN - 1


class LVExposeError(VMCraftError):
    """An LV cannot be exposed (it has a reason), or a helper failed to start."""


@dataclass(frozen=True)
class PVLocation:
    """Where a PV's bytes are readable: `path` (a block device or a file, such as the
    attach's nbdfuse disk file) from byte `offset` (the partition's start; 0 for a PV
    device or a whole-disk PV)."""

    path: str
    offset: int = 0


@dataclass(frozen=True)
class Extent:
    """LV bytes [start, start + length) are `path`'s bytes from `offset` (bytes)."""

    start: int
    length: int
    path: str
    offset: int


@dataclass(frozen=True)
class ExposedLV:
    vg_name: str
    vg_uuid: str
    lv_name: str
    lv_uuid: str
    device: str  # the block device to mount (a loop device)
    method: str  # "loop" or "nbdkit"
    size: int
    readonly: bool
    state_dir: str

    @property
    def mapper_name(self) -> str:
        """`/dev/mapper/<this>` in the guest's own terms (`rl-root`)."""
        return f"{self.vg_name.replace('-', '--')}-{self.lv_name.replace('-', '--')}"


@dataclass
class LVResources:
    """What one exposed LV holds on this host; saved as soon as each piece exists."""

    method: str = ""
    loop_device: str | None = None
    loop_backing: str | None = None
    nbdkit_pid: int | None = None
    nbdfuse_pid: int | None = None
    socket: str | None = None
    fuse_file: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def save(self, state_dir: str) -> None:
        path = os.path.join(state_dir, RESOURCES_FILE)
        atomicfile.atomic_write(path, json.dumps(asdict(self)), fsync=False)

    @classmethod
    def load(cls, state_dir: str) -> LVResources:
        try:
            with open(os.path.join(state_dir, RESOURCES_FILE)) as fh:
                return cls(**json.load(fh))
        except FileNotFoundError:
            return cls()


# --------------------------------------------------------------------------- pure maps


def pv_locations(vg: VG) -> dict[str, PVLocation]:
    """Each present PV of `vg` read through the device lvm saw it on (offset 0)."""
    return {pv.uuid: PVLocation(pv.device) for pv in vg.pvs if pv.device is not None}


def extent_map(vg: VG, lv: LV, locations: Mapping[str, PVLocation]) -> tuple[Extent, ...]:
    """The byte map of an exposable LV (pure); LVExposeError if it has a reason."""
    if lv.reason is not None:
        raise LVExposeError(lv.reason)
    out = []
    for seg in lv.segments:
        assert seg.pv_uuid is not None  # no reason: every segment is on a present PV
        pv = vg.pv(seg.pv_uuid)
        where = locations.get(seg.pv_uuid)
        if where is None:
            raise LVExposeError(f"VG {vg.name}: no location given for PV {seg.pv_uuid}")
        out.append(
            Extent(
                start=seg.start_extent * vg.extent_size,
                length=seg.extent_count * vg.extent_size,
                path=where.path,
                offset=where.offset + pv.pe_start + seg.pv_start_extent * vg.extent_size,
            )
        )
    return tuple(out)


def dm_table(vg: VG, lv: LV, devices: Mapping[str, str]) -> str:
    """The device-mapper table of `lv` (pure): one `linear` line per segment, in
    512-byte sectors: `<lv start> <length> linear <PV device> <offset on it>`.

    `devices` maps PV uuid -> the PV's block device (the kernel path needs devices, not
    files).
    """
    lines = []
    for ext in extent_map(vg, lv, {u: PVLocation(d) for u, d in devices.items()}):
        for value in (ext.start, ext.length, ext.offset):
            if value % SECTOR:
                raise LVExposeError(f"VG {vg.name}: LV {lv.name} is not sector-aligned")
        lines.append(
            f"{ext.start // SECTOR} {ext.length // SECTOR} linear {ext.path} {ext.offset // SECTOR}"
        )
    return "\n".join(lines) + "\n"


_DM_UNSAFE = re.compile(r"[^A-Za-z0-9_+.=-]")


def dm_name(attach_id: str, vg: VG, lv: LV) -> str:
    """A device-mapper name no other VM, nor the host, can hold (pure).

    Built from the VM's attach id and the VG and LV uuids, never their names:
    `vmcraft-<attach id>-<vg uuid>-<lv uuid>`, dashes of the uuids dropped.
    The host's own LVs are named `<vg>-<lv>` by lvm, which never starts with `vmcraft-`
    followed by 32-character uuids.
    """
    safe_attach = _DM_UNSAFE.sub("_", attach_id)
    name = f"vmcraft-{safe_attach}-{vg.uuid.replace('-', '')}-{lv.uuid.replace('-', '')}"
    if len(name) > DM_NAME_MAX:
        raise ValueError(f"attach id too long for a device-mapper name: {attach_id!r}")
    return name


def dm_create(
    attach_id: str, vg: VG, lv: LV, devices: Mapping[str, str], *, writable: bool = False
) -> str:
    """`dmsetup create` the LV under `dm_name` with `dm_table`; returns /dev/mapper/NAME.

    The kernel path, for hosts with device-mapper: NOT runnable on this project's
    machines (no dm module), so only `dm_table` and `dm_name` are tested. `--noudevsync`
    and `DM_DISABLE_UDEV` keep udev out; removal is `dmsetup remove NAME` by that name.
    """
    name = dm_name(attach_id, vg, lv)
    argv = ["dmsetup", "create", name, "--noudevsync"]
    if not writable:
        argv.append("--readonly")
    commands.run(
        argv,
        input_text=dm_table(vg, lv, devices),
        timeout=30,
        env={**os.environ, "DM_DISABLE_UDEV": "1"},
    )
    return f"/dev/mapper/{name}"


# --------------------------------------------------------------------------- exposing


SOCKET_NAME = "nbdkit.sock"
SOCKET_DIR_PREFIX = "vmcraft-lv-"
MAP_NAME = "segments.json"


def state_dir_for(parent: str, vg: VG, lv: LV) -> str:
    """`<parent>/lvm-<12 hex of sha256(vg uuid, lv uuid)>`: short, for the socket path."""
    digest = hashlib.sha256(f"{vg.uuid}/{lv.uuid}".encode()).hexdigest()[:12]
    return os.path.join(parent, f"{STATE_PREFIX}{digest}")


def expose(
    vg: VG,
    lv: LV,
    parent: str,
    *,
    locations: Mapping[str, PVLocation] | None = None,
    writable: bool = False,
) -> ExposedLV:
    """A block device for `lv`: a loop device for a single-segment LV, else nbdkit.

    `parent`: a private directory of this VM's attach; the LV's state goes in a
    directory under it. `locations` (PV uuid -> PVLocation) defaults to the devices
    lvm reported. Raises LVExposeError (with the LV's reason) if it cannot be exposed.
    """
    where = pv_locations(vg) if locations is None else dict(locations)
    extents = extent_map(vg, lv, where)
    if len(extents) == 1:
        return expose_loop(vg, lv, parent, locations=where, writable=writable)
    return expose_nbd(vg, lv, parent, locations=where, writable=writable)


def _exposed(vg: VG, lv: LV, *, device: str, method: str, writable: bool, sd: str) -> ExposedLV:
    return ExposedLV(
        vg_name=vg.name,
        vg_uuid=vg.uuid,
        lv_name=lv.name,
        lv_uuid=lv.uuid,
        device=device,
        method=method,
        size=lv.size,
        readonly=not writable,
        state_dir=sd,
    )


@contextlib.contextmanager
def _released_on_error(state_dir: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        release(state_dir)
        raise


def expose_loop(
    vg: VG,
    lv: LV,
    parent: str,
    *,
    locations: Mapping[str, PVLocation] | None = None,
    writable: bool = False,
) -> ExposedLV:
    """A loop device over a single-segment linear LV's bytes on its PV."""
    where = pv_locations(vg) if locations is None else locations
    extents = extent_map(vg, lv, where)
    if len(extents) != 1:
        raise LVExposeError(f"VG {vg.name}: LV {lv.name} has {len(extents)} segments")
    ext = extents[0]
    sd = state_dir_for(parent, vg, lv)
    os.makedirs(sd, mode=0o700, exist_ok=False)
    res = LVResources(method="loop", loop_backing=ext.path)
    res.save(sd)
    with _released_on_error(sd):
        res.loop_device = loopdev.attach_loop(
            ext.path, ext.offset, min(ext.length, lv.size), readonly=not writable
        )
        res.save(sd)
    return _exposed(vg, lv, device=res.loop_device, method="loop", writable=writable, sd=sd)


def nbdkit_argv(socket: str, pid_file: str, map_file: str, *, writable: bool) -> list[str]:
    """The nbdkit command serving one LV (pure).

    nbdkit runs daemonised: in the foreground it asks for a parent-death signal, which
    the kernel sends when the *thread* that started it exits, so an LV exposed by one
    task thread would vanish under the next. Its own daemon child has no such tie;
    errors still go to the log file (`--log=stderr`).
    """
    argv = ["nbdkit", "--log=stderr", "--unix", socket, "--pidfile", pid_file]
    if not writable:
        argv.append("--readonly")
    return [*argv, "python", PLUGIN, f"map={map_file}"]


def nbdfuse_argv(fuse_file: str, socket: str, pid_file: str, *, writable: bool) -> list[str]:
    argv = ["nbdfuse", "-P", pid_file]
    if not writable:
        argv.append("--readonly")
    return [*argv, fuse_file, "--unix", socket]


def _wait_for(predicate: object, timeout_s: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-2000:].strip()
    except FileNotFoundError:
        return ""


def _read_pid(pid_file: str) -> int | None:
    try:
        with open(pid_file) as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _start_daemon(
    argv: list[str],
    log_file: str,
    pid_file: str,
    *,
    ready: Callable[[], bool],
    timeout_s: float,
    failure: str,
) -> int:
    """Start a self-daemonising helper; its daemon's pid once it serves.

    The starter exits once the daemon is forked; the daemon writes its pid file after
    it listens. A starter that hangs is killed with its session.
    """
    starter = commands.spawn_detached(argv, stderr_path=log_file)
    try:
        code = starter.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        commands.kill_session(starter)
        raise LVExposeError(f"{failure}: it did not start within {timeout_s:.0f} s") from None
    if code != 0:
        raise LVExposeError(f"{failure} (exit {code}): {_tail(log_file) or 'no message'}")
    if not _wait_for(lambda: _read_pid(pid_file) is not None and ready(), timeout_s):
        pid = _read_pid(pid_file)
        if pid is not None:
            helpers.terminate(pid, pid_file, STOP_TIMEOUT_S)
        raise LVExposeError(f"{failure}: not serving: {_tail(log_file) or 'no message'}")
    pid = _read_pid(pid_file)
    assert pid is not None
    return pid


def expose_nbd(
    vg: VG,
    lv: LV,
    parent: str,
    *,
    locations: Mapping[str, PVLocation] | None = None,
    writable: bool = False,
    start_timeout_s: float = START_TIMEOUT_S,
) -> ExposedLV:
    """nbdkit (segment plugin) -> nbdfuse -> loop device, for any exposable LV."""
    where = pv_locations(vg) if locations is None else locations
    extents = extent_map(vg, lv, where)
    sd = state_dir_for(parent, vg, lv)
    os.makedirs(sd, mode=0o700, exist_ok=False)
    # Not in the state dir: a work dir deep enough overflows a unix socket path's 108
    # bytes (nbdkit makes a relative one absolute). A short private directory instead,
    # recorded at once so release removes it.
    socket = os.path.join(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX), SOCKET_NAME)
    fuse_file = os.path.join(sd, "lv")
    res = LVResources(method="nbdkit", socket=socket, fuse_file=fuse_file)
    res.save(sd)
    with _released_on_error(sd):
        map_file = os.path.join(sd, MAP_NAME)
        with open(map_file, "w") as fh:
            json.dump(
                {"size": lv.size, "writable": writable, "extents": [asdict(e) for e in extents]},
                fh,
            )
        pid_file = os.path.join(sd, "nbdkit.pid")
        log = os.path.join(sd, "nbdkit.log")
        res.nbdkit_pid = _start_daemon(
            nbdkit_argv(socket, pid_file, map_file, writable=writable),
            log,
            pid_file,
            ready=lambda: os.path.exists(socket),
            timeout_s=start_timeout_s,
            failure=f"VG {vg.name}: LV {lv.name}: nbdkit did not start",
        )
        res.save(sd)
        with open(fuse_file, "w"):
            pass
        fuse_pid_file = os.path.join(sd, "nbdfuse.pid")
        fuse_log = os.path.join(sd, "nbdfuse.log")
        fuse = commands.spawn_detached(
            nbdfuse_argv(fuse_file, socket, fuse_pid_file, writable=writable),
            stderr_path=fuse_log,
        )
        res.nbdfuse_pid = fuse.pid
        res.save(sd)
        ready = _wait_for(
            lambda: os.path.exists(fuse_pid_file) or fuse.poll() is not None, start_timeout_s
        )
        if fuse.poll() is not None or not ready or os.path.getsize(fuse_file) != lv.size:
            raise LVExposeError(
                f"VG {vg.name}: LV {lv.name}: nbdfuse did not expose the LV: "
                f"{_tail(fuse_log) or 'no message'}"
            )
        res.loop_backing = fuse_file
        res.save(sd)
        res.loop_device = loopdev.attach_loop(fuse_file, 0, lv.size, readonly=not writable)
        res.save(sd)
    return _exposed(vg, lv, device=res.loop_device, method="nbdkit", writable=writable, sd=sd)


# --------------------------------------------------------------------------- release


def release(state_dir: str) -> None:
    """Release what `expose*` recorded in `state_dir` and remove it; idempotent.

    Filesystems mounted inside the directory are unmounted first; mounts elsewhere of
    the LV's device are the caller's (a busy loop device is detached lazily by the
    kernel).
    """
    if not os.path.isdir(state_dir):
        return
    res = LVResources.load(state_dir)
    for mountpoint in mountinfo.mounts_under(state_dir):
        if mountpoint != res.fuse_file:
            mountinfo.unmount(mountpoint)
    if res.loop_device and res.loop_backing:
        helpers.detach_loop(res.loop_device, res.loop_backing)
        res.loop_device = None
        res.save(state_dir)
    if res.fuse_file and mountinfo.is_mountpoint(res.fuse_file):
        mountinfo.unmount(res.fuse_file)
    if res.nbdfuse_pid and not helpers.wait_gone(res.nbdfuse_pid, 0.5):
        helpers.terminate(res.nbdfuse_pid, res.fuse_file or state_dir, STOP_TIMEOUT_S)
    if res.nbdkit_pid:
        helpers.terminate(res.nbdkit_pid, res.socket or state_dir, STOP_TIMEOUT_S)
    if res.socket and os.path.basename(os.path.dirname(res.socket)).startswith(SOCKET_DIR_PREFIX):
        shutil.rmtree(os.path.dirname(res.socket), ignore_errors=True)
    leftover = mountinfo.mounts_under(state_dir)
    if leftover:
        raise VMCraftError(f"{state_dir}: still mounted: {', '.join(leftover)}")
    shutil.rmtree(state_dir, ignore_errors=True)


def state_dirs(parent: str) -> list[str]:
    if not os.path.isdir(parent):
        return []
    return sorted(
        os.path.join(parent, name)
        for name in os.listdir(parent)
        if name.startswith(STATE_PREFIX) and os.path.isdir(os.path.join(parent, name))
    )


def release_all(parent: str) -> None:
    """Release every exposed LV recorded under `parent` (what a reaper calls first)."""
    for sd in state_dirs(parent):
        release(sd)
