"""A hostile guest program in the real bubblewrap sandbox: nothing of the host reachable.

The guest is a tiny tree with the host's static busybox and a FAKE `dracut` that
attacks: it writes outside its root (a host path, /proc/sys, /proc/1/root), talks to
a TCP listener this test opens on the host, reads a host secret and /etc/shadow, and
tries the usual escapes (chroot, mount, a new user namespace, nsenter). Every
attempt prints SUCCEEDED or FAILED; the host side is checked independently.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.fixes.initramfs_regen import InitramfsError, regenerate_initramfs
from vmcraft_tasks.craft.sandbox import run_sandboxed

BUSYBOX = "/bin/busybox"
KERNEL = "6.1.0-99-amd64"
APPLETS = (
    *("sh", "cat", "echo", "ls", "mkdir", "touch", "rm", "sleep", "id", "ps", "hostname"),
    *("nc", "wget", "chroot", "mount", "unshare", "nsenter", "ln", "readlink", "grep"),
    *("head", "true", "false"),
)
# A sysctl that is harmless to change, should the sandbox ever be broken.
SYSCTL = "/proc/sys/kernel/printk_ratelimit_burst"

if not os.path.exists(BUSYBOX) or shutil.which("bwrap") is None:  # pragma: no cover
    pytest.skip("needs bwrap and a static busybox at /bin/busybox", allow_module_level=True)


@dataclass
class Scene:
    guest: Path
    outside: Path  # host directory the guest must not reach
    secret: str
    canary: Path  # an existing host file the guest tries to overwrite
    new_host_file: Path  # a host path the guest tries to create
    marker: str  # appears in the cmdline of every process the guest starts


def _processes_with(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{pid}: {cmdline}")
    return found


def _wait_gone(marker: str, seconds: float = 3.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    guest = tmp_path / "guest"
    for name in ("bin", "usr/bin", "etc", "proc", "dev", "sys", "tmp", "run", "mnt", "root"):
        (guest / name).mkdir(parents=True)
    shutil.copy2(BUSYBOX, guest / "bin/busybox")
    for applet in APPLETS:
        (guest / "bin" / applet).symlink_to("busybox")
    (guest / "boot").mkdir()
    (guest / f"boot/vmlinuz-{KERNEL}").write_bytes(b"not really a kernel")
    (guest / f"lib/modules/{KERNEL}").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = "host-secret-" + secrets.token_hex(8)
    (outside / "secret.txt").write_text(secret + "\n")
    canary = outside / "canary.txt"
    canary.write_text("untouched\n")
    marker = "vmcraft-marker-" + secrets.token_hex(6)
    yield Scene(guest, outside, secret, canary, outside / "created-by-guest", marker)
    # The sandbox's processes are gone after every test, whatever it did.
    assert _wait_gone(marker) == []


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on every host address; the guest must never reach it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen(8)
    sock.settimeout(0.5)
    yield sock
    sock.close()


def _host_address() -> str | None:
    """This host's own non-loopback address (no packet is sent to find it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def hostile_script(scene: Scene, port: int) -> str:
    host_ip = _host_address() or "127.0.0.1"
    attempts = {
        "write-host-path": f"echo pwned > {scene.canary}",
        "create-host-path": f"echo pwned > {scene.new_host_file}",
        "write-proc1-root": f"echo pwned > /proc/1/root{scene.canary}",
        "write-proc-self-root": f"echo pwned > /proc/self/root/../../..{scene.canary}",
        "write-sysctl": f"echo 11 > {SYSCTL}",
        "read-host-secret": f"cat {scene.outside}/secret.txt",
        "read-proc1-root-secret": f"cat /proc/1/root{scene.outside}/secret.txt",
        "read-shadow": "cat /etc/shadow",
        "read-proc1-root-shadow": "cat /proc/1/root/etc/shadow",
        "connect-loopback": f"echo hello | nc 127.0.0.1 {port}",
        "wget-loopback": f"wget -q -T 2 -O /tmp/page http://127.0.0.1:{port}/",
        "connect-host-address": f"echo hello | nc {host_ip} {port}",
        "chroot": "chroot / /bin/true",
        "mount": "mount -t tmpfs none /mnt",
        "new-user-namespace": "unshare -U -r /bin/true",
        "nsenter-pid1": "nsenter -t 1 -m -U /bin/true",
    }
    lines = [
        "#!/bin/sh",
        f": {scene.marker}",
        "try() {",
        "  name=$1; shift",
        '  if out=$(sh -c "$1" 2>&1); then echo "$name: SUCCEEDED: $out"',
        '  else echo "$name: FAILED: $out"; fi',
        "}",
    ]
    lines += [f"try {name} '{command}'" for name, command in attempts.items()]
    # Creating the host path's directories first only makes it land in the sandbox
    # (here its private /tmp); inside its own root the guest may write.
    lines += [
        f"mkdir -p {scene.new_host_file.parent} && echo inside > {scene.new_host_file}",
        "echo inside > /root/written-by-guest && echo 'write-inside-guest: SUCCEEDED'",
        'echo "visible-root: $(ls /)"',
        'echo "swaps: $(cat /proc/swaps | grep -c /dev/)"',
        'echo "processes: $(ps | grep -c .)"',
        'echo "uid: $(id -u) hostname: $(hostname)"',
        "echo hostile-done",
    ]
    return "\n".join(lines) + "\n"


def install_dracut(scene: Scene, body: str) -> None:
    path = scene.guest / "usr/bin/dracut"
    path.write_text(body)
    path.chmod(0o755)


def _results(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        name, _, rest = line.partition(": ")
        if rest.startswith(("SUCCEEDED", "FAILED")):
            found[name] = rest
    return found


def assert_host_untouched(scene: Scene, listener: socket.socket, sysctl_before: str) -> None:
    assert scene.canary.read_text() == "untouched\n"
    assert not scene.new_host_file.exists()
    assert Path(SYSCTL).read_text() == sysctl_before
    with pytest.raises(TimeoutError):
        conn, peer = listener.accept()
        conn.close()
        pytest.fail(f"the sandbox reached the host listener from {peer}")


@pytest.fixture
def sysctl_value() -> Iterator[str]:
    before = Path(SYSCTL).read_text()
    yield before
    if Path(SYSCTL).read_text() != before:  # pragma: no cover - only if contained failed
        Path(SYSCTL).write_text(before)


def test_hostile_program_reaches_nothing_of_the_host(
    scene: Scene, listener: socket.socket, sysctl_value: str
) -> None:
    install_dracut(scene, hostile_script(scene, listener.getsockname()[1]))
    result = run_sandboxed(str(scene.guest), ["/usr/bin/dracut"], timeout=60)
    output = result.stdout + result.stderr
    assert "hostile-done" in output, output
    results = _results(output)
    expected_failures = {
        "write-host-path",
        "create-host-path",
        "write-proc1-root",
        "write-proc-self-root",
        "write-sysctl",
        "read-host-secret",
        "read-proc1-root-secret",
        "read-shadow",
        "read-proc1-root-shadow",
        "connect-loopback",
        "wget-loopback",
        "connect-host-address",
        "chroot",
        "mount",
        "new-user-namespace",
        "nsenter-pid1",
    }
    for name in sorted(expected_failures):
        assert results.get(name, "").startswith("FAILED"), f"{name}: {results.get(name)}"
    assert results["write-inside-guest"].startswith("SUCCEEDED")
    # The secret and the host's shadow never appear in anything the guest printed.
    assert scene.secret not in output
    with open("/etc/shadow") as fh:
        shadow = [line.strip() for line in fh if line.strip()]
    assert not any(line in output for line in shadow)
    assert "No such file or directory" in results["read-host-secret"]
    # What the guest sees: its own tree, no swap, its own processes, root of a userns.
    visible = next(line for line in output.splitlines() if line.startswith("visible-root:"))
    assert "outside" not in visible and "guest" not in visible
    assert "swaps: 0" in output
    assert "hostname: localhost" in output
    assert_host_untouched(scene, listener, sysctl_value)
    # The write the guest may do landed inside its own root.
    assert (scene.guest / "root/written-by-guest").read_text() == "inside\n"


def test_read_only_sandbox_cannot_write_the_guest(scene: Scene) -> None:
    install_dracut(scene, f"#!/bin/sh\n: {scene.marker}\necho x > /boot/new && echo WROTE\n")
    with pytest.raises(CommandError) as caught:
        run_sandboxed(str(scene.guest), ["/usr/bin/dracut"], timeout=30, writable=False)
    assert "Read-only file system" in caught.value.stderr
    assert not (scene.guest / "boot/new").exists()


def test_hostile_generator_through_the_rebuild_fails_cleanly(
    scene: Scene, listener: socket.socket, sysctl_value: str
) -> None:
    script = hostile_script(scene, listener.getsockname()[1]) + "exit 3\n"
    install_dracut(scene, script)
    boot_before = sorted(p.name for p in (scene.guest / "boot").iterdir())
    with pytest.raises(InitramfsError, match="exit 3") as caught:
        regenerate_initramfs(str(scene.guest), arch=os.uname().machine, dry_run=False)
    assert caught.value.kernel == KERNEL
    assert "hostile-done" in caught.value.output_tail
    assert sorted(p.name for p in (scene.guest / "boot").iterdir()) == boot_before
    assert_host_untouched(scene, listener, sysctl_value)


def test_program_past_its_time_limit_is_killed_with_all_its_children(scene: Scene) -> None:
    install_dracut(
        scene,
        "#!/bin/sh\n"
        f"sh -c 'sleep 3600; : {scene.marker}-child' &\n"
        f"sh -c 'trap \"\" TERM HUP; sleep 3600; : {scene.marker}-stubborn' &\n"
        f"exec sh -c 'sleep 3600; : {scene.marker}-main'\n",
    )
    started = time.monotonic()
    with pytest.raises(CommandError) as caught:
        run_sandboxed(str(scene.guest), ["/usr/bin/dracut"], timeout=2)
    assert caught.value.timed_out
    assert time.monotonic() - started < 30
    assert _wait_gone(scene.marker) == []


def test_rebuild_timeout_is_reported(scene: Scene) -> None:
    install_dracut(scene, f"#!/bin/sh\nexec sh -c 'sleep 3600; : {scene.marker}'\n")
    with pytest.raises(InitramfsError, match="timed out after 2 s") as caught:
        regenerate_initramfs(str(scene.guest), arch=os.uname().machine, dry_run=False, timeout_s=2)
    assert caught.value.kernel == KERNEL
    assert _wait_gone(scene.marker) == []
    assert not any(p.name.endswith(".vmcraft-new") for p in (scene.guest / "boot").iterdir())


def test_background_processes_end_with_the_program(scene: Scene) -> None:
    """A generator's leftover daemon does not outlive the sandbox (pid namespace)."""
    install_dracut(scene, f"#!/bin/sh\nsh -c 'sleep 3600; : {scene.marker}' &\necho started\n")
    result = run_sandboxed(str(scene.guest), ["/usr/bin/dracut"], timeout=30)
    assert "started" in result.stdout
    assert _wait_gone(scene.marker) == []


def _mount_options(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        found = [line.split()[5] for line in fh if line.split()[4] == str(path)]
    return found[-1].split(",") if found else []


def test_noexec_read_only_guest_runs_in_a_private_exec_remount(scene: Scene) -> None:
    """Read-only inspection mounts carry noexec; the host's mount keeps it."""
    install_dracut(scene, f"#!/bin/sh\n: {scene.marker}\necho ran; echo x > /boot/new\n")
    guest = scene.guest
    mounts = [
        ["mount", "--bind", str(guest), str(guest)],
        ["mount", "-o", "remount,bind,ro,nosuid,nodev,noexec", str(guest)],
    ]
    try:
        for argv in mounts:
            commands.run(argv, timeout=30)
        assert {"ro", "noexec"} <= set(_mount_options(guest))
        with pytest.raises(CommandError) as caught:
            run_sandboxed(str(guest), ["/usr/bin/dracut"], timeout=30, writable=False)
        assert "ran" in caught.value.stdout  # it ran, from a noexec mount ...
        assert "Read-only file system" in caught.value.stderr  # ... and stayed read-only
        assert {"ro", "noexec"} <= set(_mount_options(guest))  # the host's flags unchanged
    finally:
        commands.run(["umount", str(guest)], timeout=30, check=False)
    assert not (guest / "boot/new").exists()
