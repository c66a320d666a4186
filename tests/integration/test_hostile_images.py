"""Hostile images, built for real: an image is only what its own file holds.

Each hostile image is made with qemu-img (or written by hand where qemu-img will not
make it) in the test's own directory. The host is played by a sibling directory with
a secret in it, outside the image's directory (the default image root), and where it
matters by the real /etc/shadow and /dev/loop0. Each test asserts the refusal and its
reason, and that qemu never touched the forbidden target: no qemu process started at
all, no output was written, no connection reached the test's listener.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands, convert, imageformats
from vmcraft_tasks.craft import images as images_module
from vmcraft_tasks.craft.convert import (
    TEMP_INFIX,
    ConversionError,
    SourceChangedError,
    TargetExistsError,
    convert_image,
)
from vmcraft_tasks.craft.errors import (
    AttachError,
    CorruptImageError,
    ImageChangedError,
    ImageLimitError,
    ImagePolicyError,
    PartitionLimitError,
    TransientAttachError,
)
from vmcraft_tasks.craft.imagecheck import FileIdentity, check_image
from vmcraft_tasks.craft.images import probe_image
from vmcraft_tasks.craft.settings import CraftSettings
from vmcraft_tasks.craft.vmcraft import VMCraft
from vmcraft_tasks.samples.toolkit import sha256_file

pytestmark = pytest.mark.integration

SECRET = b"root:$6$do-not-leak$abcdefghijklmnopqrstuvwxyz:19000:0:99999:7:::\n"


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *args], check=check, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Stands for the conversion host's own files: outside the image's directory."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "secret").write_bytes(SECRET * 20000)  # about 1.3 MiB
    (d / "dir").mkdir()
    (d / "dir" / "notes.txt").write_bytes(SECRET)
    return d


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@contextmanager
def no_qemu() -> Iterator[list[str]]:
    """Fail unless no qemu program ran inside the block."""
    with commands.recorded() as ran:
        yield ran
    started = [p for p in ran if p.startswith("qemu")]
    assert started == [], f"qemu ran before the refusal: {started}"


@contextmanager
def tcp_listener() -> Iterator[tuple[int, list[str]]]:
    """A listener on 127.0.0.1 that records every connection it gets."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)
    hits: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            hits.append(f"{peer[0]}:{peer[1]}")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], hits
    finally:
        time.sleep(0.2)  # a connection qemu started would have arrived by now
        stop.set()
        thread.join()
        server.close()


def overlay(path: Path, backing: str, backing_format: str = "raw", size: str = "1M") -> Path:
    """A qcow2 whose backing file is `backing`; -u: qemu-img does not open it."""
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_format, str(path), size
    )
    return path


def descriptor(extent_lines: str, *, parent: str | None = None) -> str:
    hint = f'parentFileNameHint="{parent}"\n' if parent else ""
    return (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'{hint}createType="monolithicFlat"\n\n# Extent description\n{extent_lines}\n'
        '\n# The Disk Data Base\n#DDB\nddb.adapterType = "ide"\n'
    )


def set_qcow2_data_file(path: Path, name: bytes) -> None:
    """Rewrite a qcow2's data-file name extension (qemu-img amend would open the file)."""
    buf = path.read_bytes()[:65536]
    header_length = struct.unpack_from(">I", buf, 100)[0]
    offset, extensions = header_length, []
    while True:
        kind, length = struct.unpack_from(">II", buf, offset)
        offset += 8
        if kind == 0:
            break
        extensions.append((kind, buf[offset : offset + length]))
        offset += (length + 7) & ~7
    blob = b""
    for kind, data in extensions:
        value = name if kind == imageformats.QCOW2_EXT_DATA_FILE else data
        blob += struct.pack(">II", kind, len(value)) + value + bytes(-len(value) % 8)
    blob += bytes(8)
    with open(path, "r+b") as fh:
        fh.seek(header_length)
        fh.write(blob)


def refuse_everywhere(
    image: Path,
    out: Path,
    error: type[Exception],
    match: str,
    settings: CraftSettings | None = None,
) -> None:
    """Conversion and attach both refuse `image` before qemu runs; nothing is written."""
    with no_qemu(), pytest.raises(error, match=match) as info:
        convert_image(str(image), str(out / "disk.qcow2"), settings=settings)
    assert getattr(info.value, "image", str(image)) == str(image)
    with no_qemu(), pytest.raises(error, match=match):
        VMCraft(str(image), settings=settings).launch()
    assert os.listdir(out) == []


# --------------------------------------------------------------------------- host files


def test_the_attack_works_against_bare_qemu(images, host, out):
    """What main did: qemu follows the header and copies the host file into the output."""
    evil = overlay(images / "x.qcow2", str(host / "secret"), size="64K")
    qemu_img("convert", "-O", "raw", str(evil), str(out / "leak.raw"))
    assert (out / "leak.raw").read_bytes() == (host / "secret").read_bytes()[:65536]


def test_a_backing_file_that_is_a_host_file_is_refused(images, host, out):
    evil = overlay(images / "x.qcow2", str(host / "secret"))
    refuse_everywhere(evil, out, ImagePolicyError, r"backing file .*secret.* outside the image's")


def test_etc_shadow_as_backing_file_is_refused(images, out):
    evil = overlay(images / "x.qcow2", "/etc/shadow")
    refuse_everywhere(evil, out, ImagePolicyError, "backing file '/etc/shadow' resolves to")


def test_relative_and_symlinked_backing_files_out_of_the_root_are_refused(images, host, out):
    evil = overlay(images / "up.qcow2", "../host/secret")
    refuse_everywhere(evil, out, ImagePolicyError, r"'\.\./host/secret' resolves to .*outside")
    (images / "innocent.raw").symlink_to(host / "secret")
    evil = overlay(images / "link.qcow2", "innocent.raw")
    refuse_everywhere(evil, out, ImagePolicyError, r"'innocent\.raw' resolves to .*secret")


def test_a_backing_block_device_is_refused(images, out):
    os.mknod(images / "disk", stat.S_IFBLK | 0o600, os.makedev(7, 0))  # loop0, in the root
    evil = overlay(images / "node.qcow2", "disk")
    refuse_everywhere(evil, out, ImagePolicyError, "is a block device, not a regular file")
    evil = overlay(images / "loop.qcow2", "/dev/loop0")
    refuse_everywhere(evil, out, ImagePolicyError, "'/dev/loop0' resolves to /dev/loop0, outside")
    # Even when the roots hold /dev, a device is not a file.
    everything = CraftSettings(image_roots=("/",))
    refuse_everywhere(
        evil, out, ImagePolicyError, "is a block device, not a regular file", everything
    )


def test_vmdk_extents_naming_host_paths_are_refused(images, host, out):
    vmdk = images / "x.vmdk"
    for line, reason in (
        (f'RW 2048 FLAT "{host / "secret"}" 0', "extent .*secret.* outside"),
        ('RW 2048 FLAT "/etc/shadow" 0', "extent '/etc/shadow' resolves to"),
        ('RW 2048 FLAT "../host/secret" 0', r"extent '\.\./host/secret' resolves to"),
        ('RW 2048 FLAT "/dev/loop0" 0', "extent '/dev/loop0'"),
    ):
        vmdk.write_text(descriptor(line))
        refuse_everywhere(vmdk, out, ImagePolicyError, reason)


def test_a_qcow2_data_file_on_the_host_is_refused(images, host, out):
    evil = images / "x.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o",
        f"data_file={images / 'd.raw'},data_file_raw=on", str(evil), "64K",
    )  # fmt: skip
    set_qcow2_data_file(evil, str(host / "secret").encode())
    # Against bare qemu the guest disk is the host file:
    qemu_img("convert", "-O", "raw", str(evil), str(out / "leak.raw"))
    assert (out / "leak.raw").read_bytes() == (host / "secret").read_bytes()[:65536]
    (out / "leak.raw").unlink()
    refuse_everywhere(evil, out, ImagePolicyError, r"data file .*secret.* outside")


def test_a_vvfat_backing_showing_a_host_directory_is_refused(images, host, out):
    evil = overlay(images / "x.qcow2", f"fat:16:{host / 'dir'}")
    refuse_everywhere(evil, out, ImagePolicyError, "uses the fat: protocol")


@pytest.mark.parametrize("kind", ["json", "file-prefix"])
def test_json_and_prefixed_backing_names_are_refused(images, host, out, kind):
    name = {
        "json": json.dumps({"driver": "file", "filename": str(host / "secret")}),
        "file-prefix": f"file:{host / 'secret'}",
    }[kind]
    evil = overlay(images / "x.qcow2", "json:" + name if kind == "json" else name)
    refuse_everywhere(evil, out, ImagePolicyError, "protocol")


# --------------------------------------------------------------------------- request forgery


def test_bare_qemu_img_info_backing_chain_connects(images):
    """Why the check must come first: qemu-img info --backing-chain opens nbd://."""
    with tcp_listener() as (port, hits):
        evil = overlay(images / "x.qcow2", f"nbd://127.0.0.1:{port}/export")
        qemu_img("info", "--backing-chain", str(evil), check=False)
    assert hits, "control: qemu should have connected to the listener"


def test_an_nbd_backing_never_connects(images, out):
    with tcp_listener() as (port, hits):
        evil = overlay(images / "x.qcow2", f"nbd://127.0.0.1:{port}/export")
        refuse_everywhere(evil, out, ImagePolicyError, "uses the nbd: protocol")
        evil = overlay(images / "y.qcow2", f"nbd:127.0.0.1:{port}")
        refuse_everywhere(evil, out, ImagePolicyError, "uses the nbd: protocol")
    assert hits == []


@pytest.mark.parametrize("scheme", ["http", "https", "ssh", "ftp"])
def test_network_protocol_backings_never_connect(images, out, scheme):
    with tcp_listener() as (port, hits):
        evil = overlay(images / "x.qcow2", f"{scheme}://127.0.0.1:{port}/disk.raw")
        refuse_everywhere(evil, out, ImagePolicyError, f"uses the {scheme}: protocol")
    assert hits == []


def test_a_vmdk_delta_whose_parent_is_nbd_never_connects(images, out):
    parent = images / "parent.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(parent), "1M")
    child = images / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", str(parent), "-F", "vmdk", str(child))
    with tcp_listener() as (port, hits):
        raw = bytearray(child.read_bytes())
        old = f'parentFileNameHint="{parent}"'.encode()
        new = f'parentFileNameHint="nbd://127.0.0.1:{port}"'.encode()
        at = raw.index(old)
        end = raw.index(b"\0", at)
        raw[at:end] = raw[at:end].replace(old, new)
        child.write_bytes(bytes(raw[: len(raw)]))
        refuse_everywhere(child, out, ImagePolicyError, "backing file 'nbd://127.0.0.1")
    assert hits == []


# --------------------------------------------------------------------------- differencing


def test_a_differencing_vhd_is_refused(images, out):
    disk = images / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(disk), "8M")
    raw = bytearray(disk.read_bytes())
    for at in (0, len(raw) - 512):  # the footer and its copy at the start
        struct.pack_into(">I", raw, at + 60, imageformats.VPC_DIFFERENCING)
        struct.pack_into(">I", raw, at + 64, 0)
        checksum = ~sum(raw[at : at + 512]) & 0xFFFFFFFF
        struct.pack_into(">I", raw, at + 64, checksum)
    disk.write_bytes(bytes(raw))
    refuse_everywhere(disk, out, ImagePolicyError, "differencing VHD")


def test_a_differencing_vhdx_is_refused(images, out):
    disk = images / "d.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(disk), "8M")
    raw = bytearray(disk.read_bytes())
    table = 192 * 1024
    metadata = next(
        struct.unpack_from("<Q", raw, table + 16 + i * 32 + 16)[0]
        for i in range(struct.unpack_from("<I", raw, table + 8)[0])
        if uuid.UUID(bytes_le=bytes(raw[table + 16 + i * 32 : table + 32 + i * 32]))
        == imageformats.VHDX_METADATA_REGION
    )
    for i in range(struct.unpack_from("<H", raw, metadata + 10)[0]):
        entry = metadata + 32 + i * 32
        if uuid.UUID(bytes_le=bytes(raw[entry : entry + 16])) == imageformats.VHDX_FILE_PARAMETERS:
            item = metadata + struct.unpack_from("<I", raw, entry + 16)[0]
            flags = struct.unpack_from("<I", raw, item + 4)[0]
            struct.pack_into("<I", raw, item + 4, flags | imageformats.VHDX_HAS_PARENT)
    disk.write_bytes(bytes(raw))
    refuse_everywhere(disk, out, ImagePolicyError, "differencing VHDX")


# --------------------------------------------------------------------------- allowed chains


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_an_allowed_chain_is_opened_exactly_as_checked(images, out):
    base = images / "base.raw"
    base.write_bytes(os.urandom(1 << 20))
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    with commands.recorded() as ran, _argv_log() as argvs:
        result = convert_image(str(top), str(out / "disk.raw"), target_format="raw")
    assert result.source_format == "qcow2"
    assert (out / "disk.raw").read_bytes() == base.read_bytes()
    converts = [a for a in argvs if a[:2] == ["qemu-img", "convert"]]
    assert len(converts) == 1
    source = converts[0][-2]
    assert source.startswith("json:")
    assert json.loads(source[5:])["backing"] == {
        "driver": "raw",
        "file": {"driver": "file", "filename": str(base)},
        "backing": None,
    }
    # Every qemu command got a pinned graph, never a bare image name.
    for argv in argvs:
        if argv[0] == "qemu-img":
            assert str(top) not in argv and str(base) not in argv, argv
    assert "qemu-img" in ran


@contextmanager
def _argv_log() -> Iterator[list[list[str]]]:
    argvs: list[list[str]] = []
    remove = commands.add_observer(lambda argv: argvs.append(list(argv)))
    try:
        yield argvs
    finally:
        remove()


def test_qemu_nbd_gets_the_pinned_chain(tmp_path, images, linux_gpt_qcow2, open_disk):
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", linux_gpt_qcow2.path, "-F", "qcow2", str(top))
    samples = os.path.dirname(linux_gpt_qcow2.path)
    with pytest.raises(ImagePolicyError, match="outside the image's own directory"):
        VMCraft(str(top)).launch()
    settings = CraftSettings(image_roots=(str(images), samples))
    g = VMCraft(str(top), settings=settings).launch()
    open_disk.append(g)
    assert g.image.backing_chain == (linux_gpt_qcow2.path,)
    assert len(g.list_partitions()) == 6
    qemu_nbd = next(pid for pid in g.disk.helper_pids if _cmdline(pid)[0].endswith("qemu-nbd"))
    argv = _cmdline(qemu_nbd)
    assert argv[-1] == g.image.qemu_filename()
    spec = json.loads(argv[-1][5:])
    assert spec["backing"]["file"]["filename"] == linux_gpt_qcow2.path
    assert spec["backing"]["backing"] is None


def test_a_vmdk_delta_with_its_parent_inside_converts_through_it(images, out):
    data = images / "data.raw"
    data.write_bytes(os.urandom(1 << 20))
    parent = images / "parent.vmdk"
    qemu_img("convert", "-q", "-f", "raw", "-O", "vmdk", str(data), str(parent))
    child = images / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", str(child))
    info = probe_image(str(child))
    assert info.backing_chain == (str(parent),)
    assert info.open_spec is not None and info.open_spec["backing"]["driver"] == "vmdk"
    convert_image(str(child), str(out / "disk.raw"), target_format="raw")
    assert (out / "disk.raw").read_bytes() == data.read_bytes()


def test_vmdk_descriptors_are_read_exactly_as_qemu_reads_them(images):
    """Differential: the extents the check pins are the ones qemu opens, quirks included."""
    for i in range(3):
        with open(images / f"e{i}.bin", "wb") as fh:
            fh.truncate(1 << 20)
    cases = [
        'RW 100 FLAT "e0.bin" 0',
        '\nRW 100 FLAT "e0.bin" 0',  # a blank line before: qemu opens it twice
        'RW 100 FLAT "e0.bin" 0\n\nRW 100 FLAT "e1.bin" 0',
        'RW\n 100 FLAT\n "e1.bin" 0',  # sscanf reads across lines
        'NOACCESS 100 FLAT "e0.bin" 0\nRW 100 FLAT "e2.bin" 0',
        'RDONLY 100 FLAT "e0.bin" 0\nRW 100 VMFS "e1.bin"',
        'RW 100 FLAT "e0.bin" 0 trailing\nRW 0 FLAT "e1.bin" 0\nRW 100 ZERO',
        '  RW +50 FLAT "e2.bin" +2',
    ]
    for number, lines in enumerate(cases):
        vmdk = images / f"d{number}.vmdk"
        vmdk.write_text(descriptor(lines))
        ours = [f.opened_as or f.path for f in check_image(str(vmdk)).files if f.role == "extent"]
        theirs = json.loads(qemu_img("info", "--output=json", "-f", "vmdk", str(vmdk)).stdout)
        names = [e["filename"] for e in theirs["format-specific"]["data"]["extents"]]
        assert ours == names, f"case {number}: {lines!r}"


# --------------------------------------------------------------------------- limits


def test_a_1_pib_image_is_refused(images, out):
    big = images / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "1P")
    refuse_everywhere(big, out, ImageLimitError, r"1 PiB\), above the limit of 16 TiB")


def test_a_2_eib_image_is_a_permanent_refusal(images, out):
    big = images / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(big), "2E")
    with commands.recorded() as ran, pytest.raises(ImageLimitError) as info:
        VMCraft(str(big)).launch()
    assert not isinstance(info.value, TransientAttachError)
    assert "2 EiB" in info.value.reason
    assert "qemu-nbd" not in ran
    refuse_everywhere(big, out, ImageLimitError, "2 EiB")
    # With the limit raised, qemu-nbd cannot serve it (its overlay cannot grow an L1
    # table that large): that is the image's fault, reported once, never retried.
    huge = CraftSettings(max_virtual_size_gib=1 << 40)
    with commands.recorded() as ran, pytest.raises(AttachError) as attach:
        VMCraft(str(big), settings=huge).launch()
    assert not isinstance(attach.value, TransientAttachError)
    assert ran.count("qemu-nbd") == 1


def test_the_size_limit_is_a_setting(images, out):
    disk = images / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "2G")
    small = CraftSettings(max_virtual_size_gib=1)
    refuse_everywhere(disk, out, ImageLimitError, "above the limit of 1 GiB", small)
    assert probe_image(str(disk)).virtual_size == 2 << 30


def _partitioned(path: Path, count: int, *, table_length: int = 128) -> Path:
    with open(path, "wb") as fh:
        fh.truncate((count + 4) * 1024 * 1024)
    script = f"label: gpt\ntable-length: {table_length}\n" + "size=1MiB\n" * count
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True, timeout=60)
    return path


def test_more_partitions_than_the_limit_are_refused(images):
    disk = _partitioned(images / "many.raw", 130, table_length=256)
    g = VMCraft(str(disk), settings=CraftSettings())
    with g:
        with pytest.raises(PartitionLimitError, match="130 partitions, above the limit of 128"):
            g.list_partitions()
        assert g._devices == {}  # no loop device was made for any of them
    few = _partitioned(images / "few.raw", 6)
    with (
        VMCraft(str(few), settings=CraftSettings(max_partitions=4)) as g,
        pytest.raises(PartitionLimitError, match="6 partitions, above the limit of 4"),
    ):
        g.list_partitions()
    with VMCraft(str(few), settings=CraftSettings(max_partitions=6)) as g:
        assert len(g.list_partitions()) == 6


# --------------------------------------------------------------------------- identity


def test_a_source_replaced_by_a_symlink_after_its_check_is_refused(images, host, out):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    checked = probe_image(str(source))
    source.unlink()
    source.symlink_to(host / "secret")
    with no_qemu(), pytest.raises(ImagePolicyError, match=r"the image resolves to .*secret"):
        convert_image(str(source), str(out / "disk.qcow2"), expected=checked)
    # A symlink to another image inside the root is not what was checked either.
    other = images / "other.raw"
    other.write_bytes(os.urandom(1 << 20))
    source.unlink()
    source.symlink_to(other)
    with pytest.raises(SourceChangedError, match="changed since it was checked"):
        convert_image(str(source), str(out / "disk.qcow2"), expected=checked)
    assert os.listdir(out) == []


def test_a_source_truncated_after_its_check_fails(images, out):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(4 << 20))
    checked = probe_image(str(source))
    os.truncate(source, 2 << 20)
    with pytest.raises(SourceChangedError, match="changed size from 4194304 to 2097152 bytes"):
        convert_image(str(source), str(out / "disk.qcow2"), expected=checked)
    assert os.listdir(out) == []


def test_a_truncated_qcow2_fails_without_an_earlier_check(images, out):
    source = images / "disk.qcow2"
    raw = images / "data.raw"
    raw.write_bytes(os.urandom(4 << 20))
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(source))
    os.truncate(source, source.stat().st_size // 2)
    refuse_everywhere(source, out, CorruptImageError, "truncated: the image refers to data")


def test_a_source_swapped_between_check_and_copy_is_not_converted(images, host, out, monkeypatch):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    real_reserve = convert._reserve_temp

    def reserve_then_swap(*args, **kwargs):
        reserved = real_reserve(*args, **kwargs)
        source.unlink()
        source.symlink_to(host / "secret")  # after the check, before qemu-img opens it
        return reserved

    monkeypatch.setattr(convert, "_reserve_temp", reserve_then_swap)
    with _argv_log() as argvs, pytest.raises(SourceChangedError) as info:
        convert_image(str(source), str(out / "disk.qcow2"))
    assert "between its check and the start of the conversion" in info.value.reason
    assert "replaced by a symlink" in info.value.reason
    assert not [a for a in argvs if a[:2] == ["qemu-img", "convert"]]
    assert os.listdir(out) == []


def test_an_attach_of_a_changed_image_fails(images, host, monkeypatch):
    disk = _partitioned(images / "disk.raw", 2)
    checked = probe_image(str(disk))
    with open(disk, "r+b") as fh:
        fh.seek(3 << 20)
        fh.write(b"changed")
    with no_qemu(), pytest.raises(ImageChangedError, match="was modified"):
        VMCraft(str(disk)).launch(expected=checked)
    # Swapped between the check and qemu-nbd's start:
    real_probe = images_module.probe_image

    def probe_then_swap(*args, **kwargs):
        info = real_probe(*args, **kwargs)
        disk.unlink()
        disk.symlink_to(host / "secret")
        return info

    monkeypatch.setattr(images_module, "probe_image", probe_then_swap)
    with commands.recorded() as ran, pytest.raises(ImageChangedError, match="symlink"):
        VMCraft(str(disk)).launch()
    assert "qemu-nbd" not in ran


def test_a_converted_output_is_checked_before_it_is_attached(images, host, out):
    source = _partitioned(images / "disk.raw", 2)
    target = out / "disk.qcow2"
    convert_image(str(source), str(target))
    with VMCraft(str(target)) as g:
        assert len(g.list_partitions()) == 2
    # Someone plants a qcow2 whose data file is a host file in place of the output.
    target.unlink()
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o",
        f"data_file={out / 'd.raw'},data_file_raw=on", str(target), "64K",
    )  # fmt: skip
    set_qcow2_data_file(target, str(host / "secret").encode())
    with no_qemu(), pytest.raises(ImagePolicyError, match="data file"):
        VMCraft(str(target)).launch(fmt="qcow2")


# --------------------------------------------------------------------------- target side


@pytest.mark.parametrize(
    ("source_mode", "target_mode"), [(0o600, 0o600), (0o644, 0o640), (0o666, 0o640)]
)
def test_outputs_never_allow_more_than_the_source(images, out, source_mode, target_mode):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    source.chmod(source_mode)
    convert_image(str(source), str(out / "disk.qcow2"))
    assert stat.S_IMODE((out / "disk.qcow2").stat().st_mode) == target_mode


def test_an_output_of_a_chain_is_as_private_as_its_most_private_file(images, out):
    base = images / "base.raw"
    base.write_bytes(os.urandom(1 << 20))
    base.chmod(0o600)
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    top.chmod(0o644)
    convert_image(str(top), str(out / "disk.raw"), target_format="raw")
    assert stat.S_IMODE((out / "disk.raw").stat().st_mode) == 0o600


def test_a_target_that_is_a_symlink_is_refused(images, host, out):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    before = sha256_file(str(host / "secret"))
    (out / "disk.qcow2").symlink_to(host / "secret")
    for overwrite in (False, True):
        with _argv_log() as argvs, pytest.raises(ConversionError, match="symlink"):
            convert_image(str(source), str(out / "disk.qcow2"), overwrite=overwrite)
        assert not [a for a in argvs if a[:2] == ["qemu-img", "convert"]]
    assert sha256_file(str(host / "secret")) == before
    assert os.listdir(out) == ["disk.qcow2"]


def test_overwrite_replaces_only_the_file_the_caller_made(images, out):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    target = out / "disk.qcow2"
    ours = convert_image(str(source), str(target)).target_file
    assert ours == FileIdentity.of(str(target), "output", os.lstat(target))
    ours = convert_image(str(source), str(target), overwrite=True, replaces=ours).target_file
    target.unlink()
    target.write_text("someone else's disk\n")
    with pytest.raises(TargetExistsError, match="not the file this tool made"):
        convert_image(str(source), str(target), overwrite=True, replaces=ours)
    assert target.read_text() == "someone else's disk\n"
    assert [n for n in os.listdir(out) if TEMP_INFIX in n] == []


def test_temporary_names_are_unpredictable_and_exclusive(images, out):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    seen: list[str] = []
    convert_image(
        str(source),
        str(out / "disk.qcow2"),
        progress=lambda _: seen.extend(n for n in os.listdir(out) if TEMP_INFIX in n),
    )
    token = seen[0].split(TEMP_INFIX, 1)[1]
    assert len(token) == 32 and int(token, 16) >= 0
    assert os.listdir(out) == ["disk.qcow2"]


def test_a_target_directory_anyone_may_write_is_refused(images, tmp_path):
    source = images / "disk.raw"
    source.write_bytes(os.urandom(1 << 20))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConversionError, match="writable by anyone"):
        convert_image(str(source), str(shared / "disk.qcow2"))
    shared.chmod(0o1777)  # sticky: others cannot rename or replace our files
    convert_image(str(source), str(shared / "disk.qcow2"))
