"""Filesystems caught in a crash: an ext4 journal or an XFS log holding a committed
transaction that only a replay brings home, and the same with the journal or log
broken so that the replay fails.

The crash is real: the filesystem is mounted on a loop device, a file is written and
synced, and the `shutdown -f` ioctl stops the filesystem before it checkpoints. Every
state is checked with the kernel's own mount (replay, no replay) before it is used.
"""

from __future__ import annotations

from pathlib import Path

from vmcraft_tasks.craft import commands
from vmcraft_tasks.samples.toolkit import (
    SECTOR,
    Files,
    ImageBuildError,
    loop,
    mkfs_ext4,
    mkfs_xfs,
    mount_fails,
    mounted,
    sparse_clone,
    write_synced,
    write_tree,
)

AFTER_CRASH_PATH = "/after-crash.txt"
AFTER_CRASH_TEXT = "this file exists only in the journal until it is replayed\n"
BEFORE_CRASH_PATH = "/before-crash.txt"
BEFORE_CRASH_TEXT = "written by mkfs, on disk before the crash\n"
EXT4_FS_MIB = 32
XFS_FS_MIB = 300  # mkfs.xfs refuses anything smaller


def dumpe2fs_header(fs: Path) -> str:
    # dumpe2fs exits 1 when it cannot read the journal superblock, yet prints the header.
    return commands.run(["dumpe2fs", "-h", str(fs)], timeout=60, ok_codes=(0, 1)).stdout


def ext4_root_names(fs: Path) -> set[str]:
    out = commands.run(["debugfs", "-R", "ls -p /", str(fs)], timeout=60).stdout
    # `ls -p` lines look like /ino/mode/uid/gid/name/size/
    return {line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6}


def make_dirty_ext4(
    fs: Path, label: str, uuid: str, work: Path, files: Files | None = None
) -> None:
    """Leave `fs` (EXT4_FS_MIB) with a committed but un-checkpointed transaction holding
    AFTER_CRASH_PATH; BEFORE_CRASH_PATH and `files` are on disk from mkfs.

    The shutdown ioctl commits the journal and aborts it, but the committed
    metadata still sits dirty in the loop device's page cache and the umount
    writes it home, which would make the fs look clean. So the crash state is
    the backing file as it is between shutdown and umount: copy it then.
    """
    src = write_tree(work / "ext4-src", {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT, **(files or {})})
    scratch = work / "ext4-live.img"
    mnt = work / "ext4-mnt"
    for _attempt in range(3):
        mkfs_ext4(scratch, EXT4_FS_MIB, label, uuid, src)
        with loop(scratch) as dev, mounted(dev, mnt, "ext4", "rw") as root:
            write_synced(root / AFTER_CRASH_PATH.lstrip("/"), AFTER_CRASH_TEXT)
            commands.run(["xfs_io", "-x", "-c", "shutdown -f", str(root)], timeout=60)
            sparse_clone(scratch, fs)
        names = ext4_root_names(fs)
        if "needs_recovery" in dumpe2fs_header(fs) and AFTER_CRASH_PATH[1:] not in names:
            scratch.unlink()
            return
        # Writeback (a global sync, memory pressure) beat the copy; try again.
        fs.unlink()
    raise ImageBuildError("could not capture an ext4 with an un-replayed journal")


def verify_replay(fs: Path, work: Path, fstype: str, skip_opts: str, replay_opts: str) -> None:
    """The after-crash file must appear only when the journal or log is replayed."""
    copy = work / f"{fstype}-verify.img"
    sparse_clone(fs, copy)
    mnt = work / f"{fstype}-verify-mnt"
    try:
        with loop(copy) as dev:
            with mounted(dev, mnt, fstype, skip_opts) as root:
                if (root / AFTER_CRASH_PATH[1:]).exists():
                    raise ImageBuildError(f"{fstype}: after-crash file visible without replay")
            with mounted(dev, mnt, fstype, replay_opts) as root:
                if (root / AFTER_CRASH_PATH[1:]).read_text() != AFTER_CRASH_TEXT:
                    raise ImageBuildError(f"{fstype}: replay did not bring back after-crash file")
    finally:
        copy.unlink()


def corrupt_ext4_journal(fs: Path) -> list[int]:
    """Clobber the journal superblock and the 3 blocks after it; returns the fs blocks."""
    block_size = 0
    for line in dumpe2fs_header(fs).splitlines():
        if line.startswith("Block size:"):
            block_size = int(line.split(":")[1])
    if not block_size:
        raise ImageBuildError("dumpe2fs gave no block size")
    script = "".join(f"bmap <8> {i}\n" for i in range(4))
    out = commands.run(["debugfs", "-f", "-", str(fs)], input_text=script, timeout=60).stdout
    # debugfs echoes each request ("debugfs: bmap <8> 0"); answers are bare numbers.
    blocks = [int(line) for line in out.splitlines() if line.strip().isdigit()]
    if len(blocks) != 4:
        raise ImageBuildError(f"could not map the journal's first blocks: {out!r}")
    # A journal superblock with a bad magic makes the kernel refuse to load the
    # journal at all; clobbering the following descriptor blocks too means no
    # tool can quietly salvage the transaction either.
    garbage = b"\xba\xdc\x0f\xfe" * (block_size // 4)
    with open(fs, "r+b") as fh:
        for block in blocks:
            fh.seek(block * block_size)
            fh.write(garbage)
    return blocks


def verify_ext4_broken(fs: Path, work: Path) -> str:
    """A plain ro mount fails (returns the complaint); ro,noload shows the pre-crash file."""
    copy = work / "ext4-verify.img"
    sparse_clone(fs, copy)
    mnt = work / "ext4-verify-mnt"
    try:
        with loop(copy) as dev:
            complaint = mount_fails(dev, mnt, "ext4", "ro")
            with mounted(dev, mnt, "ext4", "ro,noload") as root:
                if (root / BEFORE_CRASH_PATH[1:]).read_text() != BEFORE_CRASH_TEXT:
                    raise ImageBuildError("ro,noload mount lacks the pre-crash file")
    finally:
        copy.unlink()
    return complaint


def xfs_log_state(fs: Path) -> str:
    out = commands.run(["xfs_logprint", "-t", str(fs)], timeout=60, check=False)
    for line in out.stdout.splitlines():
        if "state:" in line:
            return line.split("state:")[1].strip().strip("<>")
    return "UNREADABLE"


def make_dirty_xfs(fs: Path, label: str, uuid: str, work: Path, files: Files | None = None) -> None:
    """Leave `fs` (XFS_FS_MIB) with AFTER_CRASH_PATH only in its log.

    Unlike ext4, a shut-down XFS refuses all further metadata writes, so the
    unmount does not write the logged changes home.
    """
    src = write_tree(work / "xfs-src", {BEFORE_CRASH_PATH: BEFORE_CRASH_TEXT, **(files or {})})
    mnt = work / "xfs-mnt"
    for _attempt in range(3):
        mkfs_xfs(fs, XFS_FS_MIB, label, uuid, src)
        # nouuid: a test may have an image with this UUID mounted at the same time.
        with loop(fs) as dev, mounted(dev, mnt, "xfs", "rw,nouuid") as root:
            write_synced(root / AFTER_CRASH_PATH.lstrip("/"), AFTER_CRASH_TEXT)
            commands.run(["xfs_io", "-x", "-c", "shutdown -f", str(root)], timeout=60)
        if xfs_log_state(fs) == "DIRTY":
            return
        fs.unlink()
    raise ImageBuildError("could not leave an xfs with a dirty log")


def corrupt_xfs_log(fs: Path) -> tuple[int, int]:
    """Overwrite the head of the internal log; returns (byte offset, length) clobbered."""
    sb = commands.run(
        ["xfs_db", "-r", "-c", "sb 0", "-c", "p logstart", str(fs)], timeout=60
    ).stdout
    logstart = int(sb.split("=")[1])
    conv = commands.run(
        ["xfs_db", "-r", "-c", f"convert fsb {logstart} daddr", str(fs)], timeout=60
    ).stdout
    # prints e.g. "0x4b030 (307248)"
    daddr = int(conv.split("(")[1].split(")")[0])
    offset = daddr * SECTOR
    # Garbage with a nonzero "cycle" in every sector: log head search then finds
    # no record header at all, which recovery treats as fatal. (Zeros would read
    # as a freshly made log and mount fine; a bad CRC at the head is trimmed away
    # as a torn write.)
    length = 64 * SECTOR
    with open(fs, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xde\xad\xbe\xef" * (length // 4))
    return offset, length


def verify_xfs_broken(fs: Path, work: Path) -> str:
    """A plain ro mount fails (returns the complaint); ro,norecovery shows the pre-crash file."""
    copy = work / "xfs-verify.img"
    sparse_clone(fs, copy)
    mnt = work / "xfs-verify-mnt"
    try:
        with loop(copy) as dev:
            complaint = mount_fails(dev, mnt, "xfs", "ro,nouuid")
            with mounted(dev, mnt, "xfs", "ro,norecovery,nouuid") as root:
                if (root / BEFORE_CRASH_PATH[1:]).read_text() != BEFORE_CRASH_TEXT:
                    raise ImageBuildError("ro,norecovery mount lacks the pre-crash file")
    finally:
        copy.unlink()
    return complaint
