"""Run a program of the guest inside a bubblewrap sandbox that holds only the guest root.

Guest binaries are untrusted (ARCHITECTURE.md, "Trust"): a converted guest's
`mkinitramfs`, `dracut` or any hook they call may be hostile or simply buggy. They
run here in their own mount, pid, network, ipc, uts and cgroup namespaces (and a
user namespace where the kernel allows one), with every capability dropped, a cleared
environment and a time limit. The only host directory they see is the guest root we
own (the converted copy, never the source image).

Why bubblewrap rather than `unshare` + `chroot`:

- bwrap is one small, widely audited binary (it is what Flatpak runs every app in),
  and it needs no setuid bit here: we are root, or it uses a user namespace.
- It builds the sandbox's mount table inside a NEW mount namespace and then
  `pivot_root`s into it, so no mount is ever added to the host's namespace and
  nothing needs to be undone if we are killed: the namespace dies with its last
  process. With unshare + chroot every mount (/proc, /dev, /sys, /tmp, the root
  bind) would be made and unmounted by hand, on every exit path, and a crash in the
  middle leaves mounts on the host.
- `chroot` only changes the path lookup root of one process; a root process inside
  can chroot again and `..` out of it, or reach the host through an inherited
  directory fd. After `pivot_root` in a private mount namespace the old root is
  detached: there is no host tree left to climb back into.

What the sandbox contains (`bwrap_argv`, pure and unit-tested):

- `/`: the guest root, bound recursively (its /boot, /usr, ... submounts come along),
  read-write for a regeneration, read-only for listings and dry runs.
- `/proc`: a fresh procfs of the sandbox's own pid namespace (it shows no host
  process; /proc/1 is bwrap's reaper inside the sandbox), mounted READ-ONLY. We
  run as root, so the sandbox's uid 0 is the host's uid 0 (a user namespace maps
  it to our own uid), and kernel sysctls check only that uid, not capabilities:
  with a writable /proc a guest script could set /proc/sys/kernel/core_pattern to
  a program of its choice, which the kernel would run as root on the host, or
  reboot the host through /proc/sysrq-trigger. bwrap's own cover of /proc/sys
  assumes an unprivileged uid and does not apply here; the containment test
  showed a host sysctl changing before this mount was made read-only.
- `/dev`: bwrap's minimal /dev (null, zero, full, random, urandom, tty, pts, shm),
  no disk devices.
- `/sys`: an EMPTY, read-only tmpfs. The generators run in generic mode
  (initramfs-tools MODULES=most, dracut --no-hostonly) and do not need sysfs; a bind
  of the host's /sys would show the conversion host's hardware, which is exactly what
  a generator must not base the guest's initramfs on (hostonly/MODULES=dep would
  pick the host's disk drivers), and it would expose host details for nothing. An
  empty mount rather than none, so a stray write lands nowhere instead of in the
  guest's own /sys directory on disk.
- `/tmp` and `/run`: fresh tmpfs mounts with a size limit, so a runaway generator
  cannot fill the host's memory.
- `/proc/swaps`: covered by a file listing no swap. procfs shows the HOST's swap
  devices in every namespace, and initramfs-tools' resume hook writes the first one
  it finds into the image as the guest's resume device (a host /dev/sdX the guest
  would wait for at boot). The cover's content comes from bwrap's stdin, so the
  command itself reads an empty stdin.

Capabilities: all are dropped (`--cap-drop ALL`). The generators only read the
guest's files (owned by uid 0, which maps to uid 0 of the user namespace) and write
the new image as that owner; none of them needs CAP_SYS_ADMIN, CAP_MKNOD or
CAP_DAC_OVERRIDE for that.

Guest roots mounted `noexec` (every read-only inspection mount is): a bind mount
keeps that flag, so nothing of the guest could run. Then the run starts in a private
mount namespace of its own (`unshare --mount --propagation private`), where those
mounts are remounted `exec` (keeping ro/rw, nosuid, nodev) before bwrap starts:
the host's mounts keep their flags, and the namespace dies with the run.

Known, accepted visibility: /proc/1/cmdline (bwrap's reaper) and the sandbox's
mountinfo name the host path of the guest root. That is a directory name we chose,
not host content, and it gives no access to anything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.commands import CommandResult
from vmcraft_tasks.craft.errors import VMCraftError

BWRAP = "bwrap"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The C locale exists in every guest; a UTF-8 locale the guest lacks makes tools warn.
SANDBOX_ENV: Mapping[str, str] = {
    "PATH": SANDBOX_PATH,
    "LANG": "C",
    "LC_ALL": "C",
    "HOME": "/root",
    "TMPDIR": "/tmp",
    "TERM": "dumb",
}
# A neutral name: a fresh uts namespace starts with a copy of the HOST's hostname.
SANDBOX_HOSTNAME = "localhost"
# dracut and mkinitramfs stage the whole image (hundreds of MiB with every driver)
# under /tmp before compressing it.
TMP_SIZE_BYTES = 4 * 1024**3
RUN_SIZE_BYTES = 64 * 1024**2
SYS_SIZE_BYTES = 4096
# /proc/swaps as on a machine with no swap at all.
EMPTY_SWAPS = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
# bwrap itself needs only a PATH to exec nothing else; the worker's environment
# (Celery settings, Redis URLs) has no business reaching it.
_BWRAP_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
# Host programs (trusted) that prepare the private mount namespace for noexec roots.
UNSHARE = "unshare"
# $1 $2 pairs of (mount point, options) up to "--", then the bwrap command line.
_EXEC_REMOUNT_SCRIPT = """set -e
while [ "$1" != "--" ]; do mount -o "$2" -- "$1"; shift 2; done
shift
exec "$@"
"""


class SandboxError(VMCraftError):
    """The sandbox cannot be set up for this guest root (no bwrap, not a directory, ...)."""

    def __init__(self, root: str, reason: str) -> None:
        self.root = root
        self.reason = reason
        super().__init__(f"sandbox for {root}: {reason}")


def bwrap_argv(
    root: str,
    command: Sequence[str],
    *,
    writable: bool = True,
    user_namespace: bool = True,
    env: Mapping[str, str] | None = None,
    workdir: str = "/",
    bwrap: str = BWRAP,
) -> list[str]:
    """The bwrap command line that runs `command` with `root` as its whole world (pure).

    `root` is a host directory (the mounted guest root); everything else in the
    sandbox is synthetic. `env` replaces SANDBOX_ENV entirely when given.
    `user_namespace` adds an explicit user namespace in which no further user
    namespace may be created (only where the kernel allows unprivileged userns; as
    root without one, `--cap-drop ALL` is what keeps the sandbox powerless).
    """
    if not os.path.isabs(root):
        raise ValueError(f"guest root must be an absolute path: {root!r}")
    if not command:
        raise ValueError("no command to run in the sandbox")
    environment = dict(SANDBOX_ENV if env is None else env)
    for key in environment:
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"bad environment variable name {key!r}")
    argv = [
        bwrap,
        # net, pid, ipc, uts, cgroup (when possible) and user (when possible).
        "--unshare-all",
        *(["--unshare-user", "--disable-userns"] if user_namespace else []),
        "--die-with-parent",  # killing us (or our timeout killing bwrap) kills the sandbox
        "--new-session",  # no TIOCSTI into a terminal we might have
        "--cap-drop",
        "ALL",
        "--hostname",
        SANDBOX_HOSTNAME,
        "--clearenv",
    ]
    for key, value in sorted(environment.items()):
        argv += ["--setenv", key, value]
    argv += ["--bind" if writable else "--ro-bind", root, "/"]
    argv += ["--proc", "/proc", "--ro-bind-data", "0", "/proc/swaps", "--remount-ro", "/proc"]
    argv += ["--dev", "/dev"]
    argv += ["--size", str(SYS_SIZE_BYTES), "--tmpfs", "/sys", "--remount-ro", "/sys"]
    argv += ["--size", str(TMP_SIZE_BYTES), "--tmpfs", "/tmp"]
    argv += ["--size", str(RUN_SIZE_BYTES), "--tmpfs", "/run"]
    argv += ["--chdir", workdir, "--", *command]
    return argv


def _unescape(field: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash in paths.
    return field.encode().decode("unicode_escape")


def _is_at_or_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def exec_remounts(root: str, mountinfo: Iterable[str]) -> list[tuple[str, str]]:
    """(mount point, remount options) making `root`'s noexec mounts executable (pure).

    Covers the mount that holds `root` and every mount below it, from
    /proc/self/mountinfo lines. The options keep everything of the current
    per-mount flags (ro/rw, nosuid, nodev, atime) except noexec, because a bind
    remount replaces all of them.
    """
    holder: tuple[str, str] | None = None
    below: list[tuple[str, str]] = []
    for line in mountinfo:
        fields = line.split()
        if len(fields) < 6:
            continue
        point, options = _unescape(fields[4]), fields[5]
        if _is_at_or_under(point, root) and point != root:
            below.append((point, options))
        elif _is_at_or_under(root, point) and (holder is None or len(point) >= len(holder[0])):
            holder = (point, options)  # the last, deepest one is what `root` sits on
    found = []
    for point, options in [*([holder] if holder else []), *below]:
        flags = options.split(",")
        if "noexec" in flags:
            kept = [flag for flag in flags if flag != "noexec"]
            found.append((point, ",".join(["remount", "bind", *kept, "exec"])))
    return found


def exec_remount_argv(remounts: Sequence[tuple[str, str]], argv: Sequence[str]) -> list[str]:
    """Run `argv` in a private mount namespace where `remounts` were applied first (pure)."""
    pairs = [item for remount in remounts for item in remount]
    return [
        UNSHARE,
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        _EXEC_REMOUNT_SCRIPT,
        "vmcraft-exec-remount",
        *pairs,
        "--",
        *argv,
    ]


def user_namespaces_available() -> bool:
    """True when this kernel lets bwrap create a user namespace."""
    try:
        with open("/proc/sys/user/max_user_namespaces") as fh:
            limit = int(fh.read().strip() or "0")
    except (OSError, ValueError):
        return False
    return limit > 0 and os.path.exists("/proc/self/ns/user")


def bwrap_path(root: str) -> str:
    """The host's bwrap program, or SandboxError (naming `root`) when it has none."""
    bwrap = shutil.which(BWRAP, path=_BWRAP_ENV["PATH"])
    if bwrap is None:
        raise SandboxError(root, "bubblewrap (bwrap) is not installed on this host")
    return bwrap


def check_root(root: str) -> str:
    """The canonical host path of a guest root fit for a sandbox, or SandboxError."""
    host = os.path.realpath(root)
    if not os.path.isdir(host):
        raise SandboxError(root, "the guest root is not a directory")
    if host == "/":
        raise SandboxError(root, "the guest root is the host's own root")
    return host


def _host_mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return fh.read().splitlines()


def run_sandboxed(
    root: str,
    command: Sequence[str],
    *,
    timeout: float,
    writable: bool = True,
    ok_codes: Sequence[int] = (0,),
    check: bool = True,
) -> CommandResult:
    """Run `command` (guest paths) inside a sandbox on the guest mounted at `root`.

    Goes through `commands.run`: on timeout bwrap is killed, and `--die-with-parent`
    plus the pid namespace take every process of the sandbox with it; a timeout or an
    exit code outside `ok_codes` raises `CommandError` (with stdout and stderr).
    Setup problems raise `SandboxError`. The command's stdin is empty: bwrap's
    stdin carries the /proc/swaps cover.
    """
    bwrap = bwrap_path(root)
    host_root = check_root(root)
    argv = bwrap_argv(
        host_root,
        command,
        writable=writable,
        user_namespace=user_namespaces_available(),
        bwrap=bwrap,
    )
    remounts = exec_remounts(host_root, _host_mountinfo())
    if remounts:
        if os.geteuid() != 0:
            raise SandboxError(root, "the guest root is mounted noexec and we are not root")
        argv = exec_remount_argv(remounts, argv)
    return commands.run(
        argv,
        timeout=timeout,
        check=check,
        ok_codes=ok_codes,
        input_text=EMPTY_SWAPS,
        env=dict(_BWRAP_ENV),
    )
