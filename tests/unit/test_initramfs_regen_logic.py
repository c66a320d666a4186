"""Offline initramfs rebuild: parsers, discovery, command lines and the rebuild/restore logic.

No bubblewrap here: `run_sandboxed` is replaced by a FAKE that plays the guest's
lister (it prints the "image", which in these trees is a text file of module paths)
and the guest's generator (it writes the image the test chose).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmcraft_tasks.craft.commands import CommandResult
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.fixes import initramfs_regen as regen
from vmcraft_tasks.craft.fixes.initramfs_regen import (
    BACKUP_SUFFIX,
    NEW_SUFFIX,
    ConfigOverride,
    Generator,
    GeneratorInfo,
    GuestKernel,
    InitramfsError,
    InitramfsRefused,
    arch_refusal,
    conf_source_order,
    detect_generator,
    find_kernels,
    generator_argv,
    initramfs_modules,
    initramfs_tools_override,
    kernel_versions,
    lister_argv,
    modules_policy,
    normalise_module,
    parse_initramfs_listing,
    parse_modules_builtin,
    regenerate_initramfs,
)
from vmcraft_tasks.craft.guestpath import GuestFS

K = "6.1.0-18-amd64"
K2 = "6.1.0-21-amd64"
MODS = f"usr/lib/modules/{K}/kernel/drivers"
OLD_IMAGE = f"{MODS}/ata/ahci.ko\n{MODS}/scsi/vmw_pvscsi.ko\n{MODS}/message/fusion/mptspi.ko\n"
NEW_IMAGE = OLD_IMAGE + f"{MODS}/block/virtio_blk.ko\n{MODS}/virtio/virtio_pci.ko\n"


# --- pure parsers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("virtio_blk", "virtio_blk"),
        ("virtio-blk", "virtio_blk"),
        ("kernel/drivers/block/virtio_blk.ko", "virtio_blk"),
        ("usr/lib/modules/6.1/kernel/drivers/char/hw_random/virtio-rng.ko.xz", "virtio_rng"),
        ("virtio_scsi.ko.zst", "virtio_scsi"),
        ("mptspi.ko.gz", "mptspi"),
    ],
)
def test_module_names_are_normalised(name: str, expected: str) -> None:
    assert normalise_module(name) == expected


def test_lsinitramfs_listing() -> None:
    listing = (
        ".\nkernel\nkernel/x86/microcode/GenuineIntel.bin\nusr/lib/modules\n"
        f"usr/lib/modules/{K}/kernel/drivers/block/virtio_blk.ko\n"
        f"usr/lib/modules/{K}/kernel/drivers/char/hw_random/virtio-rng.ko\n"
        f"usr/lib/modules/{K}/kernel/drivers/virtio\n"
        f"usr/lib/modules/{K}/modules.dep\n"
        "usr/share/doc/not-a-module.ko\n"
    )
    assert parse_initramfs_listing(listing) == {"virtio_blk", "virtio_rng"}


def test_lsinitrd_listing_with_header_and_symlinks() -> None:
    listing = (
        "Image: /boot/initramfs-5.14.0-362.el9.x86_64.img: 31M\n"
        "========================================================================\n"
        "Version: dracut-057-44.git20230822.el9\n\n"
        'Arguments: -f --no-hostonly --add-drivers "virtio_blk virtio_pci virtio_scsi"\n\n'
        "dracut modules:\nbash\nsystemd\nkernel-modules\nvirtiofs\n"
        "========================================================================\n"
        "lrwxrwxrwx   1 root     root            7 Aug 10  2021 bin -> usr/bin\n"
        "drwxr-xr-x  12 root     root            0 Aug 10  2021 usr/lib/modules\n"
        "-rw-r--r--   1 root     root        23808 Aug 10  2021 usr/lib/modules/"
        "5.14.0-362.el9.x86_64/kernel/drivers/block/virtio_blk.ko.xz\n"
        "-rw-r--r--   1 root     root        36708 Aug 10  2021 usr/lib/modules/"
        "5.14.0-362.el9.x86_64/kernel/drivers/scsi/virtio_scsi.ko.xz\n"
        "lrwxrwxrwx   1 root     root           22 Aug 10  2021 usr/lib/modules/x/y.ko -> z\n"
        "========================================================================\n"
    )
    assert parse_initramfs_listing(listing) == {"virtio_blk", "virtio_scsi", "y"}
    assert parse_initramfs_listing(listing, "5.14.0-362.el9.x86_64") == {
        "virtio_blk",
        "virtio_scsi",
    }


def test_listing_filtered_by_kernel() -> None:
    listing = (
        f"lib/modules/{K}/kernel/drivers/block/virtio_blk.ko\n"
        f"lib/modules/{K2}/kernel/drivers/ata/ahci.ko\n"
    )
    assert parse_initramfs_listing(listing, K) == {"virtio_blk"}
    assert parse_initramfs_listing(listing, K2) == {"ahci"}


def test_modules_builtin() -> None:
    text = "kernel/drivers/block/virtio_blk.ko\n\nkernel/drivers/virtio/virtio-pci.ko\n"
    assert parse_modules_builtin(text) == {"virtio_blk", "virtio_pci"}


def test_kernel_versions_sorted_numerically_and_checked() -> None:
    entries = [
        "vmlinuz-6.10.0-1-amd64",
        "vmlinuz-6.9.0-2-amd64",
        "vmlinuz-6.1.0-18-amd64",
        "vmlinuz",
        "config-6.1.0-18-amd64",
        "vmlinuz--evil",
        "vmlinuz-../../etc",
        "initrd.img-6.1.0-18-amd64",
    ]
    assert kernel_versions(entries) == ["6.1.0-18-amd64", "6.9.0-2-amd64", "6.10.0-1-amd64"]


@pytest.mark.parametrize(
    ("guest", "host", "refused"),
    [
        ("x86_64", "x86_64", False),
        ("amd64", "x86_64", False),
        ("arm64", "aarch64", False),
        ("i686", "i386", False),
        ("aarch64", "x86_64", True),
        ("x86_64", "aarch64", True),
        (None, "x86_64", True),
    ],
)
def test_arch_refusal(guest: str | None, host: str, refused: bool) -> None:
    reason = arch_refusal(guest, host)
    assert (reason is not None) is refused
    if reason and guest:
        assert guest.replace("arm64", "aarch64") in reason and host in reason


def test_modules_policy_last_assignment_wins() -> None:
    conf = "# MODULES=dep in a comment\nMODULES=most\nBUSYBOX=auto\n"
    assert modules_policy([conf]) == "most"
    assert modules_policy([conf, 'MODULES="dep"  # in conf.d\n']) == "dep"
    assert modules_policy([conf, "export MODULES='list'\n"]) == "list"
    assert modules_policy(["BUSYBOX=y\n"]) == "most"  # mkinitramfs' own fallback


def test_conf_d_order_and_masking() -> None:
    order = conf_source_order(
        ["driver-policy", "resume", "x.dpkg-dist"], ["resume", "zz-local", ".hidden", "a b"]
    )
    assert order == [
        "/usr/share/initramfs-tools/conf.d/driver-policy",
        "/etc/initramfs-tools/conf.d/resume",
        "/etc/initramfs-tools/conf.d/zz-local",
    ]


def test_modules_dep_is_built_with_most() -> None:
    override = initramfs_tools_override("dep", "")
    assert override.modules_most and override.needed
    assert "MODULES=dep" in override.notes[0] and "MODULES=most" in override.notes[0]


def test_modules_list_gets_the_missing_virtio_drivers() -> None:
    override = initramfs_tools_override("list", "virtio-blk\n# virtio_pci\nahci\n")
    assert not override.modules_most
    assert override.add_modules == ("virtio_pci", "virtio_scsi")
    assert initramfs_tools_override("list", "virtio_blk\nvirtio_pci\nvirtio_scsi\n").needed is False


def test_modules_most_needs_no_override() -> None:
    assert initramfs_tools_override("most", "").needed is False


# --- pure: command lines -----------------------------------------------------------

TOOLS = GeneratorInfo(Generator.INITRAMFS_TOOLS, "/usr/sbin/mkinitramfs", "/usr/bin/lsinitramfs")
DRACUT = GeneratorInfo(Generator.DRACUT, "/usr/bin/dracut", "/usr/bin/lsinitrd")
KERNEL = GuestKernel(K, f"/boot/vmlinuz-{K}", True)
OUT = f"/boot/initrd.img-{K}{NEW_SUFFIX}"


def test_initramfs_tools_plain_argv() -> None:
    assert generator_argv(TOOLS, KERNEL, OUT) == ["/usr/sbin/mkinitramfs", "-o", OUT, K]


def test_initramfs_tools_argv_with_temporary_confdir() -> None:
    override = ConfigOverride(modules_most=True, add_modules=("virtio_scsi",))
    argv = generator_argv(TOOLS, KERNEL, OUT, override)
    assert argv[:2] == ["/bin/sh", "-c"]
    script = argv[2]
    # Guest data travels as positional arguments, never inside the script text.
    assert K not in script and OUT not in script
    assert argv[3:] == [
        "vmcraft-mkinitramfs",
        "/usr/sbin/mkinitramfs",
        K,
        OUT,
        "MODULES=most",
        "virtio_scsi",
    ]
    assert 'exec "$program" -d "$conf" -o "$output" "$kernel"' in script
    assert "conf=/tmp/" in script  # the sandbox's private tmpfs, not the guest's disk
    assert "cp -R /etc/initramfs-tools/." in script


def test_dracut_argv_is_generic_not_hostonly() -> None:
    argv = generator_argv(DRACUT, KERNEL, OUT)
    assert argv[0] == "/usr/bin/dracut"
    assert "--no-hostonly" in argv and "--hostonly" not in argv
    assert "--no-hostonly-cmdline" in argv
    assert argv[argv.index("--add-drivers") + 1] == "virtio_blk virtio_pci virtio_scsi"
    assert argv[argv.index("--kver") + 1] == K
    assert "--force" in argv and argv[-1] == OUT


def test_mkinitrd_argv_flavours() -> None:
    rhel = GeneratorInfo(Generator.MKINITRD, "/sbin/mkinitrd", None)
    argv = generator_argv(rhel, KERNEL, "/boot/initrd-x.img.new")
    assert argv == [
        "/sbin/mkinitrd",
        "-f",
        "--with=virtio_blk",
        "--with=virtio_pci",
        "--with=virtio_scsi",
        "/boot/initrd-x.img.new",
        K,
    ]
    suse = GeneratorInfo(Generator.MKINITRD, "/sbin/mkinitrd", None, suse=True)
    argv = generator_argv(suse, KERNEL, f"/boot/initrd-{K}.new")
    assert argv == [
        "/sbin/mkinitrd",
        "-b",
        "/boot",
        "-k",
        f"vmlinuz-{K}",
        "-i",
        f"initrd-{K}.new",
        "-m",
        "virtio_blk virtio_pci virtio_scsi",
    ]


def test_lister_argv_uses_the_guest_lister_or_a_cpio_pipeline() -> None:
    assert lister_argv(TOOLS, "/boot/x", b"") == ["/usr/bin/lsinitramfs", "/boot/x"]
    bare = GeneratorInfo(Generator.MKINITRD, "/sbin/mkinitrd", None)
    argv = lister_argv(bare, "/boot/x", b"\x1f\x8b\x08\x00")
    assert argv[:2] == ["/bin/sh", "-c"] and "gzip -dc" in argv[2] and argv[-1] == "/boot/x"
    assert "cat <" in lister_argv(bare, "/boot/x", b"070701000")[2]
    with pytest.raises(InitramfsError, match="not a compressed cpio"):
        lister_argv(bare, "/boot/x", b"garbage!")


# --- guest trees -------------------------------------------------------------------


def _exe(path: Path, text: str = "#!/bin/sh\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def make_guest(
    root: Path,
    *,
    generator: str | None = "initramfs-tools",
    kernels: Sequence[str] = (K,),
    image: str | None = OLD_IMAGE,
    modules: str = "MODULES=most\n",
    builtin: str = "",
) -> Path:
    """A usr-merged guest tree; images are text files of module paths (see FakeSandbox)."""
    for name in ("usr/bin", "usr/sbin", "usr/lib", "etc", "boot", "tmp", "proc", "dev"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib"):
        (root / link).symlink_to(f"usr/{link}")
    if generator == "initramfs-tools":
        _exe(root / "usr/sbin/mkinitramfs")
        _exe(root / "usr/sbin/update-initramfs")
        _exe(root / "usr/bin/lsinitramfs")
        (root / "etc/initramfs-tools/conf.d").mkdir(parents=True)
        (root / "etc/initramfs-tools/initramfs.conf").write_text(modules)
        (root / "etc/initramfs-tools/modules").write_text("# modules\n")
    elif generator == "dracut":
        _exe(root / "usr/bin/dracut")
        _exe(root / "usr/bin/lsinitrd")
    for version in kernels:
        (root / f"boot/vmlinuz-{version}").write_bytes(b"kernel")
        moddir = root / f"usr/lib/modules/{version}"
        moddir.mkdir(parents=True)
        (moddir / "modules.builtin").write_text(builtin)
        if image is not None:
            name = "initrd.img" if generator != "dracut" else "initramfs"
            suffix = "" if generator != "dracut" else ".img"
            (root / f"boot/{name}-{version}{suffix}").write_text(image.replace(K, version))
    if kernels:
        (root / "vmlinuz").symlink_to(f"boot/vmlinuz-{kernels[-1]}")
    return root


@dataclass
class FakeSandbox:
    """Plays the guest's lister and generator; records every call."""

    root: Path
    new_image: str = NEW_IMAGE
    fail: CommandError | None = None
    clobber_live: bool = False  # the generator also scribbles over the live image
    calls: list[tuple[list[str], bool]] = field(default_factory=list)

    def __call__(
        self, root: str, argv: Sequence[str], *, timeout: float, writable: bool = True
    ) -> CommandResult:
        assert os.path.realpath(root) == os.path.realpath(self.root)
        argv = list(argv)
        self.calls.append((argv, writable))
        if argv[0].endswith(("lsinitramfs", "lsinitrd")):
            assert not writable, "listing must run read-only"
            text = (self.root / argv[1].lstrip("/")).read_text()
            return CommandResult(tuple(argv), 0, text, "", 0.01)
        assert writable, "the generator needs a writable root"
        output = self._output(argv)
        if self.clobber_live:
            live = output.removesuffix(NEW_SUFFIX)
            (self.root / live.lstrip("/")).write_text("half-written garbage")
        if self.fail is not None:
            (self.root / output.lstrip("/")).write_text("partial")
            raise self.fail
        version = argv[-1] if argv[0].endswith("mkinitramfs") else argv[5]
        if argv[0].endswith("dracut"):
            version = argv[argv.index("--kver") + 1]
        (self.root / output.lstrip("/")).write_text(self.new_image.replace(K, version))
        return CommandResult(tuple(argv), 0, "building\nI: done\n", "W: a warning\n", 0.1)

    @staticmethod
    def _output(argv: list[str]) -> str:
        if argv[0] == "/bin/sh":
            return argv[6]
        if argv[0].endswith("dracut"):
            return argv[-1]
        return argv[argv.index("-o") + 1]

    def generator_calls(self) -> list[list[str]]:
        return [argv for argv, writable in self.calls if writable]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeSandbox]:
    def install(root: Path, **kwargs: object) -> FakeSandbox:
        sandbox = FakeSandbox(root, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(regen, "run_sandboxed", sandbox)
        return sandbox

    return install


def boot_state(root: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted((root / "boot").iterdir())}


# --- discovery ---------------------------------------------------------------------


def test_kernel_discovery(tmp_path: Path) -> None:
    root = make_guest(tmp_path / "g", kernels=(K, K2))
    (root / "boot/vmlinuz-0-rescue-0123456789abcdef").write_bytes(b"rescue")  # no modules
    (root / "boot/vmlinuz-5.10.0-9-amd64").write_bytes(b"old")  # modules removed
    (root / "usr/lib/modules/6.2.0-orphan").mkdir()  # modules without a kernel
    (root / "vmlinuz").unlink()
    (root / "vmlinuz").symlink_to(f"boot/vmlinuz-{K}")
    kernels = find_kernels(GuestFS(str(root)))
    assert [k.version for k in kernels] == [K, K2]
    assert [k.default for k in kernels] == [True, False]
    assert kernels[0].vmlinuz == f"/boot/vmlinuz-{K}"


def test_kernel_discovery_defaults_to_the_newest_and_survives_hostile_links(
    tmp_path: Path,
) -> None:
    root = make_guest(tmp_path / "g", kernels=(K, K2))
    (root / "vmlinuz").unlink()
    (root / "vmlinuz").symlink_to("/etc/passwd")  # absolute: resolved inside the guest
    kernels = find_kernels(GuestFS(str(root)))
    assert [(k.version, k.default) for k in kernels] == [(K, False), (K2, True)]


def test_boot_symlink_to_host_root_stays_in_the_guest(tmp_path: Path) -> None:
    root = make_guest(tmp_path / "g", kernels=())
    (root / "boot").rmdir()
    (root / "boot").symlink_to("/")  # on the host / has no vmlinuz-*... nor does the guest
    assert find_kernels(GuestFS(str(root))) == []


def test_generator_detection(tmp_path: Path) -> None:
    tools = detect_generator(GuestFS(str(make_guest(tmp_path / "a"))))
    assert tools == GeneratorInfo(
        Generator.INITRAMFS_TOOLS, "/usr/sbin/mkinitramfs", "/usr/bin/lsinitramfs"
    )
    dracut = detect_generator(GuestFS(str(make_guest(tmp_path / "b", generator="dracut"))))
    assert dracut == GeneratorInfo(Generator.DRACUT, "/usr/bin/dracut", "/usr/bin/lsinitrd")
    none = make_guest(tmp_path / "c", generator=None)
    assert detect_generator(GuestFS(str(none))) is None
    # mkinitrd: SUSE flavour when /lib/mkinitrd exists; no lister -> cpio fallback.
    _exe(none / "usr/sbin/mkinitrd")
    info = detect_generator(GuestFS(str(none)))
    assert info == GeneratorInfo(Generator.MKINITRD, "/sbin/mkinitrd", None, suse=False)
    (none / "usr/lib/mkinitrd").mkdir()
    assert detect_generator(GuestFS(str(none))) == GeneratorInfo(
        Generator.MKINITRD, "/sbin/mkinitrd", None, suse=True
    )
    # dracut wins over its mkinitrd compatibility wrapper.
    _exe(none / "usr/bin/dracut")
    assert detect_generator(GuestFS(str(none))).kind is Generator.DRACUT  # type: ignore[union-attr]


def test_dracut_replacing_initramfs_tools_is_the_generator(tmp_path: Path) -> None:
    # Debian: removing initramfs-tools for dracut keeps initramfs-tools-core.
    root = make_guest(tmp_path / "g", generator="dracut")
    _exe(root / "usr/sbin/mkinitramfs")
    _exe(root / "usr/bin/lsinitramfs")
    assert detect_generator(GuestFS(str(root))).kind is Generator.DRACUT  # type: ignore[union-attr]
    # initramfs-tools-core alone (no dracut): its mkinitramfs is all there is.
    (root / "usr/bin/dracut").unlink()
    assert detect_generator(GuestFS(str(root))).kind is Generator.INITRAMFS_TOOLS  # type: ignore[union-attr]


def test_non_executable_generator_does_not_count(tmp_path: Path) -> None:
    root = make_guest(tmp_path / "g", generator=None)
    (root / "usr/bin/dracut").write_text("not executable")
    assert detect_generator(GuestFS(str(root))) is None


def test_generator_symlink_out_of_the_guest_is_not_followed_to_the_host(tmp_path: Path) -> None:
    root = make_guest(tmp_path / "g", generator=None)
    # On the host /usr/bin/env exists; in the guest it does not.
    (root / "usr/bin/dracut").symlink_to("/usr/bin/env")
    assert detect_generator(GuestFS(str(root))) is None


# --- refusals ----------------------------------------------------------------------


def test_missing_generator_is_refused(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g", generator=None)
    sandbox = fake(root)
    with pytest.raises(InitramfsRefused, match="no initramfs generator") as caught:
        regenerate_initramfs(str(root), arch="x86_64", dry_run=False)
    assert "dracut" in caught.value.reason and "mkinitrd" in caught.value.reason
    assert sandbox.calls == []


def test_foreign_arch_is_refused(
    tmp_path: Path, fake: Callable[..., FakeSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_guest(tmp_path / "g")
    sandbox = fake(root)
    host = os.uname().machine
    guest = "aarch64" if host != "aarch64" else "x86_64"
    with pytest.raises(InitramfsRefused, match=f"the guest is {guest}"):
        regenerate_initramfs(str(root), arch=guest, dry_run=True)
    assert sandbox.calls == []
    # Unknown arch and no readable binary in the guest: refused too.
    with pytest.raises(InitramfsRefused, match="architecture is unknown"):
        regenerate_initramfs(str(root), arch=None, dry_run=True)


def test_host_without_bwrap_is_refused(
    tmp_path: Path, fake: Callable[..., FakeSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_guest(tmp_path / "g")
    fake(root)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    with pytest.raises(InitramfsRefused, match="bubblewrap"):
        regenerate_initramfs(str(root), arch=HOST, dry_run=True)


def test_no_kernel_is_refused(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g", kernels=())
    fake(root)
    with pytest.raises(InitramfsRefused, match="no bootable kernel"):
        regenerate_initramfs(str(root), arch="x86_64", dry_run=False)


# --- the rebuild -------------------------------------------------------------------

HOST = os.uname().machine


def test_rebuild_installs_a_verified_image_and_drops_the_backup(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g")
    (root / f"boot/initrd.img-{K}").chmod(0o600)
    sandbox = fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    assert report.outcome == "rebuilt" and report.ok
    (result,) = report.kernels
    assert result.action == "rebuilt" and result.verified
    assert result.modules_before == {"ahci", "vmw_pvscsi", "mptspi"}
    assert result.modules_after == result.modules_before | {"virtio_blk", "virtio_pci"}
    assert (result.virtio_blk_before, result.virtio_blk_after) == (False, True)
    assert result.backup is None and not result.builtin
    assert "I: done" in result.output_tail and "W: a warning" in result.output_tail
    live = root / f"boot/initrd.img-{K}"
    assert live.read_text() == NEW_IMAGE
    assert stat.S_IMODE(live.stat().st_mode) == 0o600  # the live image's mode is kept
    assert sorted(boot_state(root)) == [f"initrd.img-{K}", f"vmlinuz-{K}"]
    # list old (ro), build (rw), list new (ro)
    assert [writable for _, writable in sandbox.calls] == [False, True, False]
    assert sandbox.calls[2][0][-1] == f"/boot/initrd.img-{K}{NEW_SUFFIX}"
    assert sandbox.generator_calls() == [
        ["/usr/sbin/mkinitramfs", "-o", f"/boot/initrd.img-{K}{NEW_SUFFIX}", K]
    ]
    json.dumps(report.to_dict())


def test_every_kernel_is_rebuilt(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g", kernels=(K, K2))
    fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    assert [(r.kernel, r.action) for r in report.kernels] == [(K, "rebuilt"), (K2, "rebuilt")]
    assert (root / f"boot/initrd.img-{K2}").read_text() == NEW_IMAGE.replace(K, K2)


def test_bootable_image_is_left_alone_unless_forced(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g", image=NEW_IMAGE)
    sandbox = fake(root, new_image=NEW_IMAGE + f"{MODS}/net/virtio_net.ko\n")
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    assert report.outcome == "up-to-date"
    assert report.kernels[0].action == "up-to-date"
    assert report.kernels[0].modules_after == report.kernels[0].modules_before
    assert sandbox.generator_calls() == []
    forced = regenerate_initramfs(str(root), arch=HOST, dry_run=False, force=True)
    assert forced.kernels[0].action == "rebuilt"
    assert "virtio_net" in (forced.kernels[0].modules_after or ())


def test_builtin_virtio_counts_as_bootable(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    builtin = "kernel/drivers/block/virtio_blk.ko\nkernel/drivers/virtio/virtio_pci.ko\n"
    root = make_guest(tmp_path / "g", builtin=builtin)
    fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    (result,) = report.kernels
    assert result.action == "up-to-date" and result.builtin and not result.virtio_blk_before


def test_dry_run_writes_nothing(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g", modules="MODULES=dep\n")
    sandbox = fake(root)
    before = boot_state(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=True)
    assert report.outcome == "dry-run" and report.dry_run
    (result,) = report.kernels
    assert result.action == "would-rebuild"
    assert result.modules_before == {"ahci", "vmw_pvscsi", "mptspi"}
    assert result.virtio_blk_before is False and result.modules_after is None
    assert report.modules_policy == "dep" and "MODULES=dep" in report.notes[0]
    assert boot_state(root) == before
    assert all(not writable for _, writable in sandbox.calls)


def test_modules_dep_is_rebuilt_through_a_temporary_confdir(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g", modules="MODULES=most\n")
    (root / "etc/initramfs-tools/conf.d/local").write_text("MODULES=dep\n")
    sandbox = fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    (argv,) = sandbox.generator_calls()
    assert argv[:2] == ["/bin/sh", "-c"] and argv[7] == "MODULES=most"
    assert report.modules_policy == "dep"
    assert any("MODULES=dep" in note for note in report.notes)
    # The guest's own config is not touched.
    assert (root / "etc/initramfs-tools/conf.d/local").read_text() == "MODULES=dep\n"


def test_modules_list_without_virtio_adds_them_temporarily(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g", modules="MODULES=list\n")
    (root / "etc/initramfs-tools/modules").write_text("virtio_blk\n")
    sandbox = fake(root)
    regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    (argv,) = sandbox.generator_calls()
    assert argv[7:] == ["", "virtio_pci", "virtio_scsi"]
    assert (root / "etc/initramfs-tools/modules").read_text() == "virtio_blk\n"


def test_generator_failure_keeps_the_old_image(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g")
    failure = CommandError(
        ["bwrap"], 1, "E: /etc/initramfs-tools/hooks/zz failed with return 1.\n", "I: hooks\n"
    )
    fake(root, fail=failure)
    before = boot_state(root)
    with pytest.raises(InitramfsError, match="exit 1") as caught:
        regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    error = caught.value
    assert error.kernel == K and "hooks/zz failed" in error.output_tail
    assert error.report is not None and error.report.outcome == "failed"
    assert error.report.kernels[0].action == "failed"
    assert boot_state(root) == before  # no backup, no temporary, the old image as it was


def test_generator_timeout_is_reported(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g")
    fake(root, fail=CommandError(["bwrap"], None, "", "", timed_out=True))
    with pytest.raises(InitramfsError, match="timed out after 5 s"):
        regenerate_initramfs(str(root), arch=HOST, dry_run=False, timeout_s=5)


def test_live_image_clobbered_by_a_failing_generator_is_restored(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g")
    fake(root, fail=CommandError(["bwrap"], 2, "boom\n"), clobber_live=True)
    before = boot_state(root)
    with pytest.raises(InitramfsError) as caught:
        regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    assert boot_state(root) == before
    assert caught.value.report is not None
    assert any("restored" in n for n in caught.value.report.kernels[0].notes)


def test_image_without_virtio_blk_fails_verification_and_is_discarded(
    tmp_path: Path, fake: Callable[..., FakeSandbox]
) -> None:
    root = make_guest(tmp_path / "g")
    fake(root, new_image=OLD_IMAGE + f"{MODS}/virtio/virtio_pci.ko\n")
    before = boot_state(root)
    with pytest.raises(InitramfsError, match="lacks virtio_blk") as caught:
        regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    assert boot_state(root) == before
    result = caught.value.report.kernels[0]  # type: ignore[union-attr]
    assert not result.verified and result.backup is None


def test_a_later_kernel_failing_keeps_the_earlier_rebuild(
    tmp_path: Path, fake: Callable[..., FakeSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_guest(tmp_path / "g", kernels=(K, K2))
    sandbox = fake(root)
    original = sandbox.__call__

    def second_fails(root_: str, argv: Sequence[str], **kw: object) -> CommandResult:
        if kw.get("writable") and K2 in argv:
            raise CommandError(list(argv), 1, "E: second kernel\n")
        return original(root_, argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(regen, "run_sandboxed", second_fails)
    with pytest.raises(InitramfsError, match=f"kernel {K2}") as caught:
        regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    report = caught.value.report
    assert report is not None
    assert [r.action for r in report.kernels] == ["rebuilt", "failed"]
    assert (root / f"boot/initrd.img-{K}").read_text() == NEW_IMAGE
    assert (root / f"boot/initrd.img-{K2}").read_text() == OLD_IMAGE.replace(K, K2)


def test_missing_old_image_is_built(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g", image=None)
    fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    (result,) = report.kernels
    assert result.action == "rebuilt" and result.modules_before == frozenset()
    assert (root / f"boot/initrd.img-{K}").read_text() == NEW_IMAGE


def test_dracut_guest_uses_its_image_name(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g", generator="dracut")
    sandbox = fake(root)
    report = regenerate_initramfs(str(root), arch=HOST, dry_run=False)
    (result,) = report.kernels
    assert result.initrd == f"/boot/initramfs-{K}.img" and result.generator == "dracut"
    (argv,) = sandbox.generator_calls()
    assert argv[-1] == f"/boot/initramfs-{K}.img{NEW_SUFFIX}" and "--no-hostonly" in argv
    assert report.modules_policy is None


def test_initramfs_modules_helper(tmp_path: Path, fake: Callable[..., FakeSandbox]) -> None:
    root = make_guest(tmp_path / "g")
    fake(root)
    assert initramfs_modules(str(root), K, arch=HOST) == {"ahci", "vmw_pvscsi", "mptspi"}
    # Without `arch`, the guest's own binaries tell (a copy of this host's).
    (root / "usr/bin/ls").write_bytes(Path("/bin/ls").read_bytes())
    assert initramfs_modules(str(root), K) == {"ahci", "vmw_pvscsi", "mptspi"}
    with pytest.raises(InitramfsError, match="no initramfs"):
        initramfs_modules(str(root), "9.9.9")
    with pytest.raises(InitramfsError, match="not a kernel version"):
        initramfs_modules(str(root), "../../etc")


def test_backup_suffix_is_recognisable() -> None:
    assert BACKUP_SUFFIX == ".pre-vmcraft"
