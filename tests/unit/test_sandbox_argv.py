"""The bubblewrap command line: every isolation flag, and the guest root as the only host path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmcraft_tasks.craft import sandbox
from vmcraft_tasks.craft.sandbox import SANDBOX_ENV, SandboxError, bwrap_argv, check_root

ROOT = "/var/lib/vmcraft/work/attach-1/mnt/p2"
COMMAND = ["/usr/sbin/mkinitramfs", "-o", "/boot/initrd.img-6.1.0-18-amd64.new", "6.1.0-18-amd64"]

# bwrap options that take a HOST path as their first argument (SRC DEST).
HOST_SOURCE_OPTIONS = {
    "--bind",
    "--bind-try",
    "--dev-bind",
    "--dev-bind-try",
    "--ro-bind",
    "--ro-bind-try",
}
# Options followed by N arguments, to walk the argv without misreading values as flags.
ARITY = {
    **dict.fromkeys(HOST_SOURCE_OPTIONS, 2),
    "--setenv": 2,
    "--ro-bind-data": 2,
    "--bind-data": 2,
    "--file": 2,
    "--symlink": 2,
    "--chmod": 2,
    "--cap-drop": 1,
    "--cap-add": 1,
    "--hostname": 1,
    "--proc": 1,
    "--dev": 1,
    "--tmpfs": 1,
    "--remount-ro": 1,
    "--size": 1,
    "--chdir": 1,
    "--dir": 1,
    "--uid": 1,
    "--gid": 1,
}


def options(argv: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(option, its arguments) pairs up to `--`, in order."""
    found = []
    index = 1
    while argv[index] != "--":
        name = argv[index]
        count = ARITY.get(name, 0)
        found.append((name, tuple(argv[index + 1 : index + 1 + count])))
        index += 1 + count
    return found


def command_of(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1 :]


def test_every_isolation_flag_is_present() -> None:
    argv = bwrap_argv(ROOT, COMMAND)
    names = [name for name, _ in options(argv)]
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns"):
        assert flag in names
    for flag in ("--die-with-parent", "--new-session", "--clearenv"):
        assert flag in names
    assert ("--cap-drop", ("ALL",)) in options(argv)
    assert ("--cap-add" not in names) and ("--share-net" not in names)
    # A fresh uts namespace starts with the host's name: it must be replaced.
    assert ("--hostname", ("localhost",)) in options(argv)


def test_guest_root_is_the_only_host_path_and_is_bound_at_slash() -> None:
    argv = bwrap_argv(ROOT, COMMAND)
    binds = [(name, args) for name, args in options(argv) if name in HOST_SOURCE_OPTIONS]
    assert binds == [("--bind", (ROOT, "/"))]
    # No other option smuggles a host path in (fd-based data is not a path).
    for name, args in options(argv):
        if name not in HOST_SOURCE_OPTIONS:
            assert ROOT not in args
            assert all(not arg.startswith("/var") for arg in args), (name, args)


def test_read_only_variant_binds_the_root_read_only() -> None:
    argv = bwrap_argv(ROOT, COMMAND, writable=False)
    binds = [(name, args) for name, args in options(argv) if name in HOST_SOURCE_OPTIONS]
    assert binds == [("--ro-bind", (ROOT, "/"))]


def test_root_is_mounted_before_everything_mounted_on_it() -> None:
    opts = options(bwrap_argv(ROOT, COMMAND))
    names = [name for name, _ in opts]
    root_at = names.index("--bind")
    mounts = [i for i, (name, _) in enumerate(opts) if name in ("--proc", "--dev", "--tmpfs")]
    assert mounts and all(i > root_at for i in mounts)


def test_synthetic_filesystems() -> None:
    opts = options(bwrap_argv(ROOT, COMMAND))
    assert ("--proc", ("/proc",)) in opts
    assert ("--dev", ("/dev",)) in opts
    tmpfs = [args[0] for name, args in opts if name == "--tmpfs"]
    assert tmpfs == ["/sys", "/tmp", "/run"]
    # /sys is an empty tmpfs, and read-only: nothing of the host's sysfs.
    assert ("--remount-ro", ("/sys",)) in opts
    # Every tmpfs has a size limit given just before it.
    for i, (name, _) in enumerate(opts):
        if name == "--tmpfs":
            assert opts[i - 1][0] == "--size" and int(opts[i - 1][1][0]) > 0
    # The host's swap devices are covered (fed from bwrap's stdin).
    assert ("--ro-bind-data", ("0", "/proc/swaps")) in opts
    # /proc is read-only after everything is mounted on it: the sandbox's uid 0 is the
    # host's, and sysctls such as core_pattern check nothing but that uid.
    proc_ro = opts.index(("--remount-ro", ("/proc",)))
    assert proc_ro > opts.index(("--proc", ("/proc",)))
    assert proc_ro > opts.index(("--ro-bind-data", ("0", "/proc/swaps")))


def test_environment_is_cleared_and_set_to_sane_values() -> None:
    opts = options(bwrap_argv(ROOT, COMMAND))
    names = [name for name, _ in opts]
    clear_at = names.index("--clearenv")
    env = {args[0]: args[1] for name, args in opts if name == "--setenv"}
    assert env == dict(SANDBOX_ENV)
    assert env["PATH"].split(":")[-2:] == ["/sbin", "/bin"]
    assert env["LANG"] == "C"
    assert all(i > clear_at for i, name in enumerate(names) if name == "--setenv")


def test_explicit_environment_replaces_the_default() -> None:
    opts = options(bwrap_argv(ROOT, COMMAND, env={"PATH": "/bin"}))
    assert [args for name, args in opts if name == "--setenv"] == [("PATH", "/bin")]


def test_command_follows_the_separator_unchanged() -> None:
    argv = bwrap_argv(ROOT, COMMAND)
    assert argv[0] == "bwrap"
    assert command_of(argv) == COMMAND
    assert ("--chdir", ("/",)) in options(argv)


def test_without_user_namespace_capabilities_are_still_dropped() -> None:
    opts = options(bwrap_argv(ROOT, COMMAND, user_namespace=False))
    names = [name for name, _ in opts]
    assert "--unshare-user" not in names and "--disable-userns" not in names
    assert "--unshare-all" in names
    assert ("--cap-drop", ("ALL",)) in opts


@pytest.mark.parametrize(
    ("root", "command", "env"),
    [
        ("relative/root", COMMAND, None),
        (ROOT, [], None),
        (ROOT, COMMAND, {"BAD=NAME": "x"}),
        (ROOT, COMMAND, {"": "x"}),
    ],
)
def test_bad_arguments_are_refused(
    root: str, command: list[str], env: dict[str, str] | None
) -> None:
    with pytest.raises(ValueError):
        bwrap_argv(root, command, env=env)


def test_check_root_refuses_the_host_root_and_non_directories(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="host's own root"):
        check_root("/")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SandboxError, match="not a directory"):
        check_root(str(tmp_path / "file"))
    with pytest.raises(SandboxError, match="not a directory"):
        check_root(str(tmp_path / "missing"))
    # A symlink to the host root is the host root.
    (tmp_path / "up").symlink_to("/")
    with pytest.raises(SandboxError, match="host's own root"):
        check_root(str(tmp_path / "up"))
    assert check_root(str(tmp_path)) == os.path.realpath(tmp_path)


MOUNTINFO = [
    "22 1 0:21 / /proc rw,relatime - proc proc rw",
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
    "30 27 0:30 / /var/lib/vmcraft rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw",
    f"40 30 7:0 / {ROOT} ro,nosuid,nodev,noexec,relatime - ext4 /dev/loop0 ro,noload",
    f"41 40 7:1 / {ROOT}/boot ro,nosuid,nodev,noexec,relatime - ext4 /dev/loop1 ro",
    f"42 40 7:2 / {ROOT}/usr rw,nosuid,nodev,relatime - ext4 /dev/loop2 rw",
    r"43 40 7:3 / /var/lib/vmcraft/work/attach-1/mnt/p2\040x ro,noexec - ext4 /dev/loop3 ro",
    "44 30 7:4 / /var/lib/vmcraft/other ro,noexec - ext4 /dev/loop4 ro",
]


def test_noexec_mounts_of_the_guest_are_found_with_their_flags_kept() -> None:
    assert sandbox.exec_remounts(ROOT, MOUNTINFO) == [
        (ROOT, "remount,bind,ro,nosuid,nodev,relatime,exec"),
        (f"{ROOT}/boot", "remount,bind,ro,nosuid,nodev,relatime,exec"),
    ]


def test_root_inside_a_noexec_mount_gets_that_mount_remounted() -> None:
    inside = "/var/lib/vmcraft/work/plain-dir"
    assert sandbox.exec_remounts(inside, MOUNTINFO) == [
        ("/var/lib/vmcraft", "remount,bind,rw,nosuid,nodev,relatime,exec")
    ]
    assert sandbox.exec_remounts("/srv/guest", MOUNTINFO) == []


def test_exec_remount_runs_in_a_private_mount_namespace() -> None:
    inner = bwrap_argv(ROOT, COMMAND)
    argv = sandbox.exec_remount_argv([(ROOT, "remount,bind,ro,exec")], inner)
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[4:6] == ["/bin/sh", "-c"]
    # Paths and options are arguments of the script, never part of its text.
    assert ROOT not in argv[6]
    assert argv[7:11] == ["vmcraft-exec-remount", ROOT, "remount,bind,ro,exec", "--"]
    assert argv[11:] == inner


def test_missing_bwrap_is_a_sandbox_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    with pytest.raises(SandboxError, match="bubblewrap"):
        sandbox.run_sandboxed(str(tmp_path), ["/bin/true"], timeout=5)
