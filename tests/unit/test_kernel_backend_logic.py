"""Logic tests for the kernel NBD backend, against a fake sysfs/dev/proc tree.

Nothing here touches a real nbd device: `FakeQemuNbdRunner` stands in for qemu-nbd and
blockdev by editing the fake tree the way the kernel and udev would. These tests prove
the backend's decisions (which device, when to retry, what to clean up), not that the
kernel driver behaves as modelled.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from vmcraft_tasks.craft.commands import CommandResult
from vmcraft_tasks.craft.errors import (
    AttachError,
    BackendUnavailableError,
    CommandError,
    PartitionError,
    TransientAttachError,
)
from vmcraft_tasks.craft.images import ImageInfo
from vmcraft_tasks.craft.nbd.base import AttachedDisk
from vmcraft_tasks.craft.nbd.kernel import (
    KernelNbdBackend,
    NbdDeviceState,
    build_connect_argv,
    classify_connect_error,
    pick_free_device,
    read_device_states,
)
from vmcraft_tasks.craft.partitions import Partition
from vmcraft_tasks.craft.retry import RetryPolicy, call_with_retry

FOREIGN_PID = 777  # a process outside our lock that grabs a device


class FakeHost:
    """A fake /sys, /dev and /proc with nbd devices, laid out like the real ones."""

    def __init__(
        self,
        root: Path,
        devices: Sequence[int] = (0, 1, 2, 3),
        *,
        module: bool = True,
        max_part: int = 16,
        dev_nodes: bool = True,
    ) -> None:
        self.sysfs = root / "sys"
        self.dev = root / "dev"
        self.proc = root / "proc"
        self.lock_path = root / "lock" / "vmcraft-nbd.lock"
        for d in (self.sysfs / "block", self.dev, self.proc):
            d.mkdir(parents=True)
        if module:
            params = self.sysfs / "module" / "nbd" / "parameters"
            params.mkdir(parents=True)
            (params / "max_part").write_text(f"{max_part}\n")
        for n in devices:
            block = self.sysfs / "block" / f"nbd{n}"
            block.mkdir()
            (block / "size").write_text("0\n")
            if dev_nodes:
                (self.dev / f"nbd{n}").touch()

    def block(self, name: str) -> Path:
        return self.sysfs / "block" / name

    def take(self, name: str, pid: int = FOREIGN_PID, size: int = 2048) -> None:
        """Mark a device as connected by someone (pid and size set)."""
        (self.block(name) / "pid").write_text(f"{pid}\n")
        (self.block(name) / "size").write_text(f"{size}\n")

    def is_free(self, name: str) -> bool:
        block = self.block(name)
        return not (block / "pid").exists() and (block / "size").read_text().strip() == "0"

    def add_process(self, pid: int, argv: Sequence[str], tgid: int | None = None) -> None:
        d = self.proc / str(pid)
        d.mkdir(exist_ok=True)
        (d / "cmdline").write_text("\0".join(argv) + "\0")
        (d / "status").write_text(f"Name:\tx\nTgid:\t{tgid or pid}\nPid:\t{pid}\n")

    def remove_process(self, pid: int) -> None:
        d = self.proc / str(pid)
        for f in d.glob("*"):
            f.unlink()
        if d.exists():
            d.rmdir()

    def lock_is_taken(self) -> bool:
        """Try the host lock from a separate descriptor, as another process would."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


class FakeQemuNbdRunner:
    """Fake command runner: simulates `qemu-nbd --connect/--disconnect` and `blockdev`.

    A successful connect writes what the kernel and udev would: the pid file, sysfs
    pid/size, /dev/nbdNpM nodes, and /proc/<pid> for the daemon. A connect to a device
    that already has a pid fails like the real NBD_SET_SOCK EBUSY does.
    """

    def __init__(
        self,
        host: FakeHost,
        *,
        failures: Sequence[str | None] = (),
        take_device_on_failure: bool = False,
        publish_pid: bool = True,
        partitions: int = 2,
        connect_delay_s: float = 0.0,
        helper_survives_disconnect: bool = False,
        sysfs_reports_thread: bool = False,
    ) -> None:
        self.host = host
        self.failures = list(failures)  # per connect call: None = succeed, str = stderr
        self.take_device_on_failure = take_device_on_failure
        self.publish_pid = publish_pid
        self.partitions = partitions
        self.connect_delay_s = connect_delay_s
        self.helper_survives_disconnect = helper_survives_disconnect
        self.sysfs_reports_thread = sysfs_reports_thread
        self.calls: list[list[str]] = []
        self.lock_held_at_connect: list[bool] = []
        self.blockdev_fails = False
        self._next_pid = 4000
        self._mutex = threading.Lock()  # the fake "kernel" itself must be race-free

    def connects(self) -> list[list[str]]:
        return [c for c in self.calls if any(a.startswith("--connect=") for a in c)]

    def disconnects(self) -> list[list[str]]:
        return [c for c in self.calls if "--disconnect" in c]

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        ok_codes: Sequence[int] = (0,),
    ) -> CommandResult:
        args = [str(a) for a in argv]
        with self._mutex:
            self.calls.append(args)
        if args[0] == "qemu-nbd" and "--disconnect" in args:
            return self._disconnect(args)
        if args[0] == "qemu-nbd":
            return self._connect(args)
        if args[:2] == ["blockdev", "--rereadpt"]:
            if self.blockdev_fails:
                raise CommandError(args, 1, "blockdev: ioctl error on BLKRRPART: busy")
            return CommandResult(tuple(args), 0, "", "", 0.0)
        raise AssertionError(f"unexpected command {args}")

    def _connect(self, args: list[str]) -> CommandResult:
        self.lock_held_at_connect.append(self.host.lock_is_taken())
        device = next(a.split("=", 1)[1] for a in args if a.startswith("--connect="))
        pid_file = next(a.split("=", 1)[1] for a in args if a.startswith("--pid-file="))
        name = os.path.basename(device)
        with self._mutex:
            outcome = self.failures.pop(0) if self.failures else None
            if outcome is not None:
                if self.take_device_on_failure:
                    self.host.take(name)
                # Like real qemu-nbd, the dead daemon leaves its pid file behind.
                Path(pid_file).write_text(f"{self._next_pid}\n")
                self._next_pid += 1
                raise CommandError(args, 1, f"qemu-nbd: {outcome}\n")
            if (self.host.block(name) / "pid").exists():
                raise CommandError(args, 1, "qemu-nbd: Failed to set NBD socket\n")
            pid = self._next_pid
            self._next_pid += 2
            Path(pid_file).write_text(f"{pid}\n")
            self.host.add_process(pid, args)
            # NBD_SET_SIZE happens before qemu-nbd's parent exits; reserve the device
            # right away so the fake kernel refuses a second connect.
            (self.host.block(name) / "size").write_text("2097152\n")
        if self.connect_delay_s:
            time.sleep(self.connect_delay_s)
        if self.publish_pid:
            sysfs_pid = pid
            if self.sysfs_reports_thread:
                # Real sysfs shows the NBD_DO_IT thread, not the process in the pid file.
                sysfs_pid = pid + 1
                self.host.add_process(sysfs_pid, args, tgid=pid)
            (self.host.block(name) / "pid").write_text(f"{sysfs_pid}\n")
        for n in range(1, self.partitions + 1):
            (self.host.dev / f"{name}p{n}").touch()
        return CommandResult(tuple(args), 0, "", "", 0.0)

    def _disconnect(self, args: list[str]) -> CommandResult:
        name = os.path.basename(args[-1])
        block = self.host.block(name)
        with self._mutex:
            pid_path = block / "pid"
            owner = int(pid_path.read_text()) if pid_path.exists() else None
            if pid_path.exists():
                pid_path.unlink()
            (block / "size").write_text("0\n")
            for node in self.host.dev.glob(f"{name}p*"):
                node.unlink()
            if owner is not None and not self.helper_survives_disconnect:
                status = self.host.proc / str(owner) / "status"
                tgid = owner
                if status.exists():
                    for line in status.read_text().splitlines():
                        if line.startswith("Tgid:"):
                            tgid = int(line.split()[1])
                self.host.remove_process(owner)
                self.host.remove_process(tgid)
        return CommandResult(tuple(args), 0, f"{args[-1]} disconnected\n", "", 0.0)


class FakeClock:
    """monotonic/sleep pair where sleeping only advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], None] | None = None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


class KillRecorder:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.fixture
def image(tmp_path: Path) -> ImageInfo:
    return ImageInfo(
        path=str(tmp_path / "guest.qcow2"),
        format="qcow2",
        virtual_size=1 << 30,
        identity="abc123",
    )


def make_backend(
    host: FakeHost,
    runner: FakeQemuNbdRunner,
    *,
    clock: FakeClock | None = None,
    kill: KillRecorder | None = None,
    settle_timeout_s: float = 5.0,
    lock_timeout_s: float = 60.0,
) -> KernelNbdBackend:
    clock = clock or FakeClock()
    return KernelNbdBackend(
        sysfs_root=str(host.sysfs),
        dev_root=str(host.dev),
        proc_root=str(host.proc),
        lock_path=str(host.lock_path),
        poll_interval_s=0.25,
        runner=runner,
        sleep=clock.sleep,
        monotonic=clock.monotonic,
        kill=kill or KillRecorder(),
        settle_timeout_s=settle_timeout_s,
        lock_timeout_s=lock_timeout_s,
    )


def state(name: str, *, pid: bool = False, size: int = 0) -> NbdDeviceState:
    return NbdDeviceState(name=name, pid_present=pid, pid=100 if pid else None, size_sectors=size)


def partition(number: int) -> Partition:
    return Partition(
        number=number, start_sector=2048, size_sectors=4096, sector_size=512, type="83", table="dos"
    )


# ---- availability ---------------------------------------------------------------------


def test_logic_module_missing_is_unavailable(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, module=False)
    backend = make_backend(host, FakeQemuNbdRunner(host))
    with pytest.raises(
        BackendUnavailableError, match=r"not loaded: run `modprobe nbd max_part=16`"
    ):
        backend.check_available()


def test_logic_max_part_zero_is_unavailable(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, max_part=0)
    backend = make_backend(host, FakeQemuNbdRunner(host))
    with pytest.raises(BackendUnavailableError) as info:
        backend.check_available()
    assert "without max_part" in str(info.value)
    assert "modprobe -r nbd && modprobe nbd max_part=16" in str(info.value)


def test_logic_no_dev_nodes_is_unavailable(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, dev_nodes=False)
    backend = make_backend(host, FakeQemuNbdRunner(host))
    with pytest.raises(BackendUnavailableError, match="nbd"):
        backend.check_available()


def test_logic_available_with_module_max_part_and_nodes(host: FakeHost) -> None:
    make_backend(host, FakeQemuNbdRunner(host)).check_available()


def test_logic_attach_without_module_fails_before_running_anything(
    tmp_path: Path, image: ImageInfo
) -> None:
    host = FakeHost(tmp_path, module=False)
    runner = FakeQemuNbdRunner(host)
    with pytest.raises(BackendUnavailableError) as info:
        make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert info.value.image == image.path
    assert not isinstance(info.value, TransientAttachError)
    assert runner.calls == []


# ---- device choice --------------------------------------------------------------------


def test_logic_pick_skips_devices_with_pid_or_nonzero_size() -> None:
    states = [state("nbd0", pid=True), state("nbd1", size=2048), state("nbd2")]
    assert pick_free_device(states) == "nbd2"


def test_logic_pick_needs_both_no_pid_and_zero_size() -> None:
    # pid gone but size still set: mid-teardown, not free yet.
    assert pick_free_device([state("nbd0", size=8)]) is None
    # size 0 but a pid: mid-setup, not free either.
    assert pick_free_device([state("nbd0", pid=True)]) is None
    unreadable = NbdDeviceState(name="nbd0", pid_present=False, pid=None, size_sectors=None)
    assert pick_free_device([unreadable]) is None


def test_logic_picks_lowest_free_device_numerically() -> None:
    states = [state("nbd10"), state("nbd2"), state("nbd1", pid=True)]
    assert pick_free_device(states) == "nbd2"


def test_logic_pick_returns_none_when_all_busy() -> None:
    assert pick_free_device([state("nbd0", pid=True), state("nbd1", size=1)]) is None
    assert pick_free_device([]) is None


def test_logic_read_device_states_sorted_numerically(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, devices=(10, 2, 1))
    host.take("nbd1", pid=42, size=100)
    (host.sysfs / "block" / "loop0").mkdir()  # other block devices are ignored
    states = read_device_states(str(host.sysfs))
    assert [s.name for s in states] == ["nbd1", "nbd2", "nbd10"]
    assert states[0] == NbdDeviceState("nbd1", pid_present=True, pid=42, size_sectors=100)
    assert states[1].free and states[2].free


def test_logic_attach_uses_lowest_free_device_numerically(tmp_path: Path, image: ImageInfo) -> None:
    host = FakeHost(tmp_path, devices=(1, 2, 10))
    host.take("nbd1")
    runner = FakeQemuNbdRunner(host)
    disk = make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert disk.nbd_device == str(host.dev / "nbd2")


def test_logic_attach_skips_busy_devices(host: FakeHost, image: ImageInfo, tmp_path: Path) -> None:
    host.take("nbd0")
    (host.block("nbd1") / "size").write_text("4096\n")  # being torn down: pid gone, size not
    runner = FakeQemuNbdRunner(host)
    disk = make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert disk.nbd_device == str(host.dev / "nbd2")


def test_logic_attach_skips_devices_without_dev_node(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    (host.dev / "nbd0").unlink()
    runner = FakeQemuNbdRunner(host)
    disk = make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert disk.nbd_device == str(host.dev / "nbd1")


def test_logic_no_free_device_is_transient(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    for n in range(4):
        host.take(f"nbd{n}")
    runner = FakeQemuNbdRunner(host)
    with pytest.raises(TransientAttachError, match=r"no free nbd device \(all 4 busy\)"):
        make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert runner.connects() == []
    assert not host.lock_is_taken()


# ---- attach command line and result ---------------------------------------------------


def test_logic_attach_returns_disk_with_device_and_helper_pid(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    runner = FakeQemuNbdRunner(host)
    disk = make_backend(host, runner).attach(image, readonly=True, state_dir=str(state_dir))
    dev = str(host.dev / "nbd0")
    assert disk.backend == "kernel"
    assert disk.disk_path == dev and disk.nbd_device == dev
    assert disk.helper_pids == [4000]
    assert disk.state_dir == str(state_dir) and disk.readonly
    assert runner.connects() == [
        [
            "qemu-nbd",
            f"--connect={dev}",
            "--format=qcow2",
            "--cache=writeback",
            "--snapshot",
            f"--pid-file={state_dir / 'qemu-nbd.pid'}",
            image.qemu_filename(),
        ]
    ]


def test_logic_readonly_passes_snapshot_write_mode_does_not(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host)
    backend = make_backend(host, runner)
    backend.attach(image, readonly=True, state_dir=str(tmp_path / "ro"))
    backend.attach(image, readonly=False, state_dir=str(tmp_path / "rw"))
    ro, rw = runner.connects()
    assert "--snapshot" in ro
    assert "--snapshot" not in rw
    assert not any(a in ("--read-only", "-r") for a in ro + rw)


def test_logic_build_connect_argv_names_format_and_puts_image_last(image: ImageInfo) -> None:
    argv = build_connect_argv(
        "/dev/nbd3", image, readonly=False, pid_file="/s/qemu-nbd.pid", cache_mode="none"
    )
    assert argv[:2] == ["qemu-nbd", "--connect=/dev/nbd3"]
    assert "--format=qcow2" in argv and "--cache=none" in argv
    assert "--fork" not in argv
    assert argv[-1] == image.qemu_filename()


def test_logic_helper_pid_comes_from_pid_file_when_sysfs_names_a_thread(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host, sysfs_reports_thread=True)
    backend = make_backend(host, runner)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert disk.helper_pids == [4000]
    assert (host.block("nbd0") / "pid").read_text().strip() == "4001"
    # The thread id in sysfs is matched to our process through its Tgid.
    backend.detach(disk)
    assert len(runner.disconnects()) == 1
    assert host.is_free("nbd0")


def test_logic_stale_pid_file_is_removed_before_connect(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    state_dir = tmp_path / "s"
    state_dir.mkdir()
    (state_dir / "qemu-nbd.pid").write_text("1\n")
    disk = make_backend(host, FakeQemuNbdRunner(host)).attach(
        image, readonly=True, state_dir=str(state_dir)
    )
    assert disk.helper_pids == [4000]


# ---- host lock ------------------------------------------------------------------------


def test_logic_lock_held_during_connect_and_released_after(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host)
    make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert runner.lock_held_at_connect == [True]
    assert not host.lock_is_taken()


def test_logic_lock_released_after_failed_connect(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host, failures=["Failed to set NBD socket"])
    with pytest.raises(TransientAttachError):
        make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert runner.lock_held_at_connect == [True]
    assert not host.lock_is_taken()


def test_logic_lock_wait_times_out_as_transient(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    host.lock_path.parent.mkdir(parents=True)
    holder = os.open(host.lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        runner = FakeQemuNbdRunner(host)
        backend = make_backend(host, runner, lock_timeout_s=2.0)
        with pytest.raises(TransientAttachError, match="host nbd lock"):
            backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
        assert runner.calls == []
    finally:
        os.close(holder)


def test_logic_concurrent_attaches_never_share_a_device(tmp_path: Path, image: ImageInfo) -> None:
    host = FakeHost(tmp_path, devices=range(8))
    # The delay widens the window between "device looks free" and "pid appears" so a
    # missing lock would show up as two threads picking the same device.
    runner = FakeQemuNbdRunner(host, connect_delay_s=0.03)
    backend = KernelNbdBackend(
        sysfs_root=str(host.sysfs),
        dev_root=str(host.dev),
        proc_root=str(host.proc),
        lock_path=str(host.lock_path),
        poll_interval_s=0.001,
        runner=runner,
        kill=KillRecorder(),
    )
    disks: list[AttachedDisk] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            disks.append(backend.attach(image, readonly=True, state_dir=str(tmp_path / f"s{i}")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    devices = [d.nbd_device for d in disks]
    assert len(devices) == 6 and len(set(devices)) == 6
    assert all(runner.lock_held_at_connect)
    assert not host.lock_is_taken()


# ---- failures and retry ---------------------------------------------------------------


def test_logic_busy_is_transient_and_retry_succeeds_on_next_device(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    # Another host process (outside our lock) grabs nbd0 between our pick and connect.
    runner = FakeQemuNbdRunner(
        host,
        failures=["Failed to open /dev/nbd0: Device or resource busy"],
        take_device_on_failure=True,
    )
    backend = make_backend(host, runner)
    slept: list[float] = []

    def attempt(_n: int) -> AttachedDisk:
        return backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))

    disk, attempts = call_with_retry(attempt, RetryPolicy(attempts=3), sleep=slept.append)
    disk.attempts = attempts
    assert attempts == 2 and disk.attempts == 2
    assert len(slept) == 1
    assert [c[1] for c in runner.connects()] == [
        f"--connect={host.dev / 'nbd0'}",
        f"--connect={host.dev / 'nbd1'}",
    ]
    assert disk.nbd_device == str(host.dev / "nbd1")
    # nbd0 belongs to the other process now: the failed attempt must not disconnect it.
    assert runner.disconnects() == []
    assert (host.block("nbd0") / "pid").read_text().strip() == str(FOREIGN_PID)


def test_logic_failed_set_socket_is_transient(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host, failures=["Failed to set NBD socket"])
    with pytest.raises(TransientAttachError, match="taken by another process"):
        make_backend(host, runner).attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert not (tmp_path / "s" / "qemu-nbd.pid").exists()
    assert host.is_free("nbd0")


def test_logic_image_format_error_fails_at_once(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(
        host, failures=["Failed to blk_new_open 'guest.qcow2': Image is not in qcow2 format"]
    )
    backend = make_backend(host, runner)
    slept: list[float] = []
    with pytest.raises(AttachError) as info:
        call_with_retry(
            lambda _n: backend.attach(image, readonly=True, state_dir=str(tmp_path / "s")),
            RetryPolicy(attempts=3),
            sleep=slept.append,
        )
    assert not isinstance(info.value, TransientAttachError)
    assert info.value.attempts == 1
    assert "not in qcow2 format" in str(info.value)
    assert len(runner.connects()) == 1 and slept == []
    assert not (tmp_path / "s" / "qemu-nbd.pid").exists()
    assert host.is_free("nbd0")


def test_logic_pid_never_appears_disconnects_then_transient(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    clock = FakeClock()
    kill = KillRecorder()
    runner = FakeQemuNbdRunner(host, publish_pid=False)
    backend = make_backend(host, runner, clock=clock, kill=kill, settle_timeout_s=2.0)
    with pytest.raises(TransientAttachError, match="did not come up"):
        backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert runner.disconnects() == [["qemu-nbd", "--disconnect", str(host.dev / "nbd0")]]
    assert runner.calls.index(runner.disconnects()[0]) > runner.calls.index(runner.connects()[0])
    assert clock.now >= 2.0
    assert host.is_free("nbd0")
    # The daemon is still alive in the fake /proc: it is ours, so it gets SIGTERM.
    assert kill.sent == [(4000, signal.SIGTERM)]
    assert not (tmp_path / "s" / "qemu-nbd.pid").exists()
    assert not host.lock_is_taken()


def test_logic_pid_appearing_late_is_waited_for(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    clock = FakeClock()
    runner = FakeQemuNbdRunner(host, publish_pid=False)
    polls: list[int] = []

    def kernel_catches_up() -> None:
        polls.append(1)
        if len(polls) == 3:
            (host.block("nbd0") / "pid").write_text("4000\n")

    clock.on_sleep = kernel_catches_up
    disk = make_backend(host, runner, clock=clock).attach(
        image, readonly=True, state_dir=str(tmp_path / "s")
    )
    assert disk.nbd_device == str(host.dev / "nbd0")
    assert runner.disconnects() == []


def test_logic_qemu_nbd_missing_is_unavailable(image: ImageInfo) -> None:
    exc = CommandError(["qemu-nbd"], None, reason="program not found (qemu-nbd)")
    error = classify_connect_error(image.path, "/dev/nbd0", exc)
    assert isinstance(error, BackendUnavailableError)


@pytest.mark.parametrize(
    ("stderr", "transient"),
    [
        ("qemu-nbd: Failed to open /dev/nbd0: Device or resource busy", True),
        ("qemu-nbd: Failed to set NBD socket", True),
        ("qemu-nbd: Failed to open /dev/nbd0: No such file or directory", True),
        ("qemu-nbd: Failed to open /dev/nbd0: Permission denied", False),
        ("qemu-nbd: Failed to blk_new_open 'x.vmdk': Image is not in vmdk format", False),
        ("qemu-nbd: Could not open 'x.qcow2': Could not open backing file: No such file", False),
        ('qemu-nbd: Failed to get "write" lock\nIs another process using the image?', False),
    ],
)
def test_logic_classify_connect_errors(stderr: str, transient: bool, image: ImageInfo) -> None:
    exc = CommandError(["qemu-nbd"], 1, stderr)
    error = classify_connect_error(image.path, "/dev/nbd0", exc)
    assert isinstance(error, TransientAttachError) is transient
    assert isinstance(error, AttachError)
    assert not isinstance(error, BackendUnavailableError)


def test_logic_connect_timeout_is_transient(image: ImageInfo) -> None:
    exc = CommandError(["qemu-nbd"], None, timed_out=True)
    assert isinstance(classify_connect_error(image.path, "/dev/nbd0", exc), TransientAttachError)


# ---- partitions -----------------------------------------------------------------------


def test_logic_partition_device_names_nbd_partition(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    backend = make_backend(host, FakeQemuNbdRunner(host))
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    assert backend.partition_device(disk, partition(2)) == f"{host.dev / 'nbd0'}p2"


def test_logic_partition_device_waits_for_udev(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    clock = FakeClock()
    backend = make_backend(host, FakeQemuNbdRunner(host, partitions=0), clock=clock)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    clock.on_sleep = (host.dev / "nbd0p1").touch  # udev creates the node while we wait
    assert backend.partition_device(disk, partition(1)) == f"{host.dev / 'nbd0'}p1"
    assert clock.sleeps  # it did have to wait


def test_logic_partition_device_missing_raises_after_settle(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    clock = FakeClock()
    backend = make_backend(host, FakeQemuNbdRunner(host), clock=clock, settle_timeout_s=1.0)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    start = clock.now
    with pytest.raises(AttachError, match="nbd0p5 did not appear"):
        backend.partition_device(disk, partition(5))
    assert clock.now - start >= 1.0


def test_logic_release_partition_devices_runs_nothing(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host)
    backend = make_backend(host, runner)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    before = list(runner.calls)
    backend.release_partition_devices(disk)
    assert runner.calls == before


def test_logic_reread_partitions_runs_blockdev(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host)
    backend = make_backend(host, runner)
    disk = backend.attach(image, readonly=False, state_dir=str(tmp_path / "s"))
    backend.reread_partitions(disk)
    assert runner.calls[-1] == ["blockdev", "--rereadpt", str(host.dev / "nbd0")]
    runner.blockdev_fails = True
    with pytest.raises(PartitionError):
        backend.reread_partitions(disk)


# ---- detach ---------------------------------------------------------------------------


def test_logic_detach_disconnects_and_is_idempotent(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    kill = KillRecorder()
    runner = FakeQemuNbdRunner(host)
    backend = make_backend(host, runner, kill=kill)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    backend.detach(disk)
    assert runner.disconnects() == [["qemu-nbd", "--disconnect", str(host.dev / "nbd0")]]
    assert host.is_free("nbd0")
    assert not (tmp_path / "s" / "qemu-nbd.pid").exists()
    backend.detach(disk)
    assert len(runner.disconnects()) == 1
    assert kill.sent == []


def test_logic_second_detach_leaves_a_reused_device_alone(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host)
    backend = make_backend(host, runner)
    first = backend.attach(image, readonly=True, state_dir=str(tmp_path / "a"))
    backend.detach(first)
    second = backend.attach(image, readonly=True, state_dir=str(tmp_path / "b"))
    assert second.nbd_device == first.nbd_device
    backend.detach(first)  # late duplicate detach of the first disk
    assert len(runner.disconnects()) == 1
    assert not host.is_free("nbd0")


def test_logic_detach_sigterms_only_the_surviving_helper_pid(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    kill = KillRecorder()
    runner = FakeQemuNbdRunner(host, helper_survives_disconnect=True)
    backend = make_backend(host, runner, kill=kill)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    other = backend.attach(image, readonly=True, state_dir=str(tmp_path / "t"))
    backend.detach(disk)
    assert kill.sent == [(disk.helper_pids[0], signal.SIGTERM)]
    assert other.helper_pids[0] not in [pid for pid, _ in kill.sent]


def test_logic_detach_does_not_kill_a_reused_pid(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    kill = KillRecorder()
    runner = FakeQemuNbdRunner(host)
    backend = make_backend(host, runner, kill=kill)
    disk = backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    backend.detach(disk)
    # The helper's pid now belongs to an unrelated program.
    host.add_process(disk.helper_pids[0], ["/usr/bin/sleep", "100"])
    backend.detach(disk)
    assert kill.sent == []


def test_logic_detach_of_disk_without_device_is_noop(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    runner = FakeQemuNbdRunner(host)
    disk = AttachedDisk(
        backend="kernel", image=image, readonly=True, disk_path="x", state_dir=str(tmp_path)
    )
    make_backend(host, runner).detach(disk)
    assert runner.calls == []


def test_logic_interrupt_while_waiting_disconnects(
    host: FakeHost, image: ImageInfo, tmp_path: Path
) -> None:
    clock = FakeClock()
    runner = FakeQemuNbdRunner(host, publish_pid=False)

    def interrupted() -> None:
        raise KeyboardInterrupt

    clock.on_sleep = interrupted
    backend = make_backend(host, runner, clock=clock)
    with pytest.raises(KeyboardInterrupt):
        backend.attach(image, readonly=True, state_dir=str(tmp_path / "s"))
    clock.on_sleep = None
    assert len(runner.disconnects()) == 1
    assert host.is_free("nbd0")
    assert not host.lock_is_taken()
