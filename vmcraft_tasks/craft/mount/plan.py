"""Mount planning: which options, which driver, which fallback rungs (pure).

The ladder follows the performance guide: normal, then `ro,norecovery`, then
`ro,noload`, then NTFS `force`, filtered by what each filesystem accepts:

- ext2/3/4 treat `norecovery` as an alias of `noload`, so the ladder tries the
  `noload` rung once instead of the same kernel flag twice.
- XFS rejects `noload`; its no-replay rung is `norecovery`.
- btrfs calls its no-replay rung `rescue=nologreplay`.
- An unknown filesystem gets the whole ladder and lets the kernel probe.

Every mount carries `nosuid,nodev`; read-only inspection adds `noexec`. On a
read-only attach the device is the throw-away overlay, so the "normal" rung may
replay a journal there: the guest is then seen as its own kernel would see it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

EXT_TYPES = frozenset({"ext2", "ext3", "ext4"})
NTFS_TYPES = frozenset({"ntfs", "ntfs3"})
UNMOUNTABLE_TYPES = frozenset(
    {"swap", "crypto_LUKS", "LVM2_member", "linux_raid_member", "BitLocker"}
)

STRATEGY_NORMAL = "normal"
STRATEGY_NORECOVERY = "ro-norecovery"
STRATEGY_NOLOAD = "ro-noload"
STRATEGY_NTFS_FORCE = "ntfs-force"


@dataclass(frozen=True)
class MountStrategy:
    name: str
    program: str  # "mount", "ntfs-3g" or "fusefat"
    fstype: str | None  # the -t argument for `mount`
    options: tuple[str, ...]
    driver: str  # "kernel" or "fuse"
    skips_journal: bool  # contents may be the stale pre-journal view

    def argv(self, device: str, mountpoint: str) -> list[str]:
        opts = ",".join(self.options)
        if self.program == "mount":
            typed = ["-t", self.fstype] if self.fstype else []
            return ["mount", *typed, "-o", opts, device, mountpoint]
        return [self.program, "-o", opts, device, mountpoint]


def safety_options(readonly: bool) -> tuple[str, ...]:
    return ("nosuid", "nodev", "noexec") if readonly else ("nosuid", "nodev")


def _mode(readonly: bool) -> str:
    return "ro" if readonly else "rw"


def default_options(fstype: str | None, readonly: bool) -> tuple[str, ...]:
    """Options for a single, no-fallback mount of `fstype` (pure)."""
    safe = safety_options(readonly)
    if fstype in EXT_TYPES:
        return ("ro", "noload", *safe) if readonly else ("rw", *safe)
    if fstype == "xfs":
        return ("ro", "norecovery", "nouuid", *safe) if readonly else ("rw", "nouuid", *safe)
    if fstype == "btrfs":
        return ("ro", "rescue=nologreplay", *safe) if readonly else ("rw", *safe)
    if fstype == "vfat":
        return (_mode(readonly), "utf8", *safe)
    return (_mode(readonly), *safe)


def _kernel_has(fstype: str, kernel_filesystems: Collection[str]) -> bool:
    return fstype in kernel_filesystems


def plan_strategies(
    fstype: str | None,
    *,
    readonly: bool,
    kernel_filesystems: Collection[str],
) -> list[MountStrategy]:
    """The ordered rungs to try for one filesystem (pure).

    `kernel_filesystems` is what the host kernel can mount (from /proc/filesystems
    and its module list); a missing driver switches to the FUSE driver read-only.
    """
    safe = safety_options(readonly)
    mode = _mode(readonly)
    if fstype in UNMOUNTABLE_TYPES:
        return []
    if fstype in EXT_TYPES:
        return [
            MountStrategy(STRATEGY_NORMAL, "mount", fstype, (mode, *safe), "kernel", False),
            MountStrategy(
                STRATEGY_NOLOAD, "mount", fstype, ("ro", "noload", *safe), "kernel", True
            ),
        ]
    if fstype == "xfs":
        # Clones of one template share an XFS UUID; nouuid lets them mount side by side,
        # in either mode: converted copies of clones are attached writable, and without
        # it the second copy would fall to the no-replay rung (a stale view) instead of
        # replaying its log.
        return [
            MountStrategy(
                STRATEGY_NORMAL, "mount", "xfs", (mode, "nouuid", *safe), "kernel", False
            ),
            MountStrategy(
                STRATEGY_NORECOVERY,
                "mount",
                "xfs",
                ("ro", "norecovery", "nouuid", *safe),
                "kernel",
                True,
            ),
        ]
    if fstype == "btrfs":
        return [
            MountStrategy(STRATEGY_NORMAL, "mount", "btrfs", (mode, *safe), "kernel", False),
            MountStrategy(
                STRATEGY_NORECOVERY,
                "mount",
                "btrfs",
                ("ro", "rescue=nologreplay", *safe),
                "kernel",
                True,
            ),
        ]
    if fstype in NTFS_TYPES:
        if _kernel_has("ntfs3", kernel_filesystems):
            return [
                MountStrategy(STRATEGY_NORMAL, "mount", "ntfs3", (mode, *safe), "kernel", False),
                MountStrategy(
                    STRATEGY_NTFS_FORCE, "mount", "ntfs3", ("ro", "force", *safe), "kernel", False
                ),
            ]
        # ntfs-3g mounts an unclean or hibernated volume read-only by itself; the
        # force rung stays for parity with the kernel driver's ladder.
        return [
            MountStrategy(STRATEGY_NORMAL, "ntfs-3g", None, ("ro", *safe), "fuse", False),
            MountStrategy(
                STRATEGY_NTFS_FORCE, "ntfs-3g", None, ("ro", "force", *safe), "fuse", False
            ),
        ]
    if fstype == "vfat":
        if _kernel_has("vfat", kernel_filesystems):
            return [
                MountStrategy(
                    STRATEGY_NORMAL, "mount", "vfat", (mode, "utf8", *safe), "kernel", False
                )
            ]
        return [MountStrategy(STRATEGY_NORMAL, "fusefat", None, ("ro", *safe), "fuse", False)]
    # Unknown or unrecognised: let the kernel probe, with the whole ladder.
    return [
        MountStrategy(STRATEGY_NORMAL, "mount", fstype, (mode, *safe), "kernel", False),
        MountStrategy(
            STRATEGY_NORECOVERY, "mount", fstype, ("ro", "norecovery", *safe), "kernel", True
        ),
        MountStrategy(STRATEGY_NOLOAD, "mount", fstype, ("ro", "noload", *safe), "kernel", True),
    ]


def parse_proc_filesystems(text: str) -> set[str]:
    """Filesystem names from /proc/filesystems (pure)."""
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if parts:
            names.add(parts[-1])
    return names


def parse_modules_list(text: str) -> set[str]:
    """Filesystem driver names from modules.dep or modules.builtin (pure).

    A driver that is a loadable module is mountable even before it is loaded:
    `mount` loads it on demand.
    """
    names = set()
    for line in text.splitlines():
        path = line.split(":", 1)[0].strip()
        if "/fs/" in path:
            names.add(path.rsplit("/", 1)[-1].split(".ko", 1)[0])
    return names
