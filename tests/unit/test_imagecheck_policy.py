"""The reference policy, identities and limits, on hand-made image files.

`check_image` reads headers in Python only: every test here also asserts that no
command ran, which is the point (qemu must not open anything before the check).
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from tests.unit.test_imagecheck_formats import descriptor, qcow2_header, vpc_footer
from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft import imageformats as fmts
from vmcraft_tasks.craft.errors import (
    CorruptImageError,
    ImageChangedError,
    ImageLimitError,
    ImageNotFoundError,
    ImagePolicyError,
    UnsupportedImageError,
)
from vmcraft_tasks.craft.imagecheck import (
    FileIdentity,
    ImagePolicy,
    check_image,
    describe_change,
    layer_spec,
    qemu_filename,
)
from vmcraft_tasks.craft.settings import CraftSettings

GIB = 1 << 30


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Stands for the host: a directory outside the image's own directory."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "secret").write_bytes(b"root:$6$secret\n" * 100)
    return d


@pytest.fixture
def no_commands():
    with commands.recorded() as ran:
        yield ran
    assert ran == [], f"the check ran {ran}"


def qcow2_file(path: Path, **kwargs) -> Path:
    path.write_bytes(qcow2_header(**kwargs))
    return path


def raw_file(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


# --------------------------------------------------------------------------- references


def test_a_backing_file_on_the_host_is_refused(images, host, no_commands):
    top = qcow2_file(
        images / "x.qcow2", backing=str(host / "secret").encode(), backing_format=b"raw"
    )
    with pytest.raises(ImagePolicyError) as info:
        check_image(str(top))
    assert info.value.image == str(top)
    assert "backing file" in info.value.reason
    assert "outside the image's own directory" in info.value.reason


def test_a_relative_backing_file_climbing_out_is_refused(images, host, no_commands):
    top = qcow2_file(images / "x.qcow2", backing=b"../host/secret", backing_format=b"raw")
    with pytest.raises(ImagePolicyError, match=r"resolves to .*host/secret, outside"):
        check_image(str(top))


@pytest.mark.parametrize(
    "name",
    [
        b"nbd://127.0.0.1:10809",
        b"nbd:unix:/run/x.sock",
        b"fat:16:/etc",
        b'json:{"driver":"file","filename":"/etc/shadow"}',
        b"http://127.0.0.1/disk",
        b"https://127.0.0.1/disk",
        b"ssh://root@127.0.0.1/disk",
        b"file:/etc/shadow",
    ],
)
def test_protocol_backing_files_are_refused(images, name, no_commands):
    top = qcow2_file(images / "x.qcow2", backing=name, backing_format=b"raw")
    protocol = name.split(b":")[0].decode()
    with pytest.raises(ImagePolicyError, match=f"uses the {protocol}: protocol"):
        check_image(str(top))


def test_a_symlink_to_the_host_is_followed_and_refused(images, host, no_commands):
    (images / "base.raw").symlink_to(host / "secret")
    top = qcow2_file(images / "x.qcow2", backing=b"base.raw", backing_format=b"raw")
    with pytest.raises(ImagePolicyError, match="outside"):
        check_image(str(top))


def test_a_device_node_inside_the_roots_is_refused(images, no_commands):
    os.mknod(images / "disk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    top = qcow2_file(images / "x.qcow2", backing=b"disk", backing_format=b"raw")
    with pytest.raises(ImagePolicyError, match="block device, not a regular file"):
        check_image(str(top))


def test_a_fifo_is_refused_without_blocking(images, no_commands):
    os.mkfifo(images / "pipe")
    top = qcow2_file(images / "x.qcow2", backing=b"pipe", backing_format=b"raw")
    with pytest.raises(ImagePolicyError, match="FIFO"):
        check_image(str(top))


def test_backing_formats_other_than_disk_formats_are_refused(images, no_commands):
    raw_file(images / "base.raw")
    for fmt in (b"vvfat", b"host_device", b"nbd", b"file", b"qed"):
        top = qcow2_file(images / "x.qcow2", backing=b"base.raw", backing_format=fmt)
        with pytest.raises(ImagePolicyError, match="backing files are allowed"):
            check_image(str(top))


def test_a_chain_inside_the_directory_is_accepted_and_pinned(images, no_commands):
    raw_file(images / "base.raw", 1 << 20)
    qcow2_file(images / "mid.qcow2", backing=b"base.raw", backing_format=b"raw", size=1 << 20)
    top = qcow2_file(images / "top.qcow2", backing=b"mid.qcow2", size=1 << 20)  # no format
    checked = check_image(str(top))
    assert checked.backing_chain == (str(images / "mid.qcow2"), str(images / "base.raw"))
    assert [f.role for f in checked.files] == ["image", "backing file", "backing file"]
    assert checked.open_spec() == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(top)},
        "backing": {
            "driver": "qcow2",  # no backing format in the header: decided by content
            "file": {"driver": "file", "filename": str(images / "mid.qcow2")},
            "backing": {
                "driver": "raw",
                "file": {"driver": "file", "filename": str(images / "base.raw")},
                "backing": None,
            },
        },
    }


def test_configured_roots_allow_other_directories(tmp_path, images, no_commands):
    store = tmp_path / "store"
    store.mkdir()
    raw_file(store / "base.raw")
    top = qcow2_file(images / "x.qcow2", backing=str(store / "base.raw").encode(), size=1 << 20)
    with pytest.raises(ImagePolicyError):
        check_image(str(top))
    checked = check_image(str(top), roots=[str(images), str(store)])
    assert checked.backing_chain == (str(store / "base.raw"),)
    with pytest.raises(ImagePolicyError, match=r"the image roots \("):
        check_image(str(top), roots=[str(store)])


def test_the_image_itself_must_be_inside_the_roots(tmp_path, images, host, no_commands):
    (images / "disk.raw").symlink_to(host / "secret")
    with pytest.raises(ImagePolicyError, match=r"the image resolves to .*secret, outside"):
        check_image(str(images / "disk.raw"))
    raw_file(images / "real.raw")
    with pytest.raises(ImagePolicyError, match="outside the image roots"):
        check_image(str(images / "real.raw"), roots=[str(host)])


def test_a_backing_loop_is_refused(images, no_commands):
    qcow2_file(images / "a.qcow2", backing=b"b.qcow2", backing_format=b"qcow2")
    qcow2_file(images / "b.qcow2", backing=b"a.qcow2", backing_format=b"qcow2")
    with pytest.raises(CorruptImageError, match="loops back"):
        check_image(str(images / "a.qcow2"))


def test_a_missing_backing_file_is_named(images, no_commands):
    top = qcow2_file(images / "x.qcow2", backing=b"gone.qcow2")
    with pytest.raises(CorruptImageError, match=r"backing chain is broken: .*gone\.qcow2"):
        check_image(str(top))


def test_a_qcow2_data_file_on_the_host_is_refused(images, host, no_commands):
    top = qcow2_file(
        images / "x.qcow2",
        data_file=str(host / "secret").encode(),
        incompatible=fmts.QCOW2_INCOMPAT_DATA_FILE,
    )
    with pytest.raises(ImagePolicyError, match=r"data file .*outside"):
        check_image(str(top))


def test_a_qcow2_data_file_inside_is_pinned(images, no_commands):
    raw_file(images / "data.raw")
    top = qcow2_file(
        images / "x.qcow2", data_file=b"data.raw", incompatible=fmts.QCOW2_INCOMPAT_DATA_FILE
    )
    spec = check_image(str(top)).open_spec()
    assert spec["data-file"] == {"driver": "file", "filename": str(images / "data.raw")}


def test_vmdk_extents_are_checked_and_pinned(images, host, no_commands):
    raw_file(images / "a-flat.vmdk", 2048 * 512)
    vmdk = images / "a.vmdk"
    vmdk.write_text(descriptor('RW 2048 FLAT "a-flat.vmdk" 0'))
    checked = check_image(str(vmdk))
    assert checked.open_spec()["extents"] == {"0": {"driver": "file"}}
    assert checked.virtual_size == 2048 * 512
    for line in (
        f'RW 2048 FLAT "{host / "secret"}" 0',
        'RW 2048 FLAT "../host/secret" 0',
        'RDONLY 2048 FLAT "/etc/shadow" 0',  # skipped by qemu, refused all the same
        'RW 2048 FLAT "/dev/sda" 0',
    ):
        vmdk.write_text(descriptor(line))
        with pytest.raises(ImagePolicyError, match=r"extent .*outside"):
            check_image(str(vmdk))


def test_a_short_flat_extent_is_refused(images, no_commands):
    raw_file(images / "a-flat.vmdk", 1024 * 512)
    vmdk = images / "a.vmdk"
    vmdk.write_text(descriptor('RW 2048 FLAT "a-flat.vmdk" 0'))
    with pytest.raises(CorruptImageError, match="truncated: extent"):
        check_image(str(vmdk))


def test_a_vmdk_parent_on_the_host_is_refused(images, no_commands):
    raw_file(images / "a-flat.vmdk", 2048 * 512)
    vmdk = images / "a.vmdk"
    text = descriptor('RW 2048 FLAT "a-flat.vmdk" 0')
    vmdk.write_text(text.replace("createType", 'parentFileNameHint="/etc/base.vmdk"\ncreateType'))
    with pytest.raises(ImagePolicyError, match=r"backing file '/etc/base.vmdk'"):
        check_image(str(vmdk))


def test_a_differencing_vhd_is_refused(images, no_commands):
    disk = images / "d.vhd"
    disk.write_bytes(vpc_footer(fmts.VPC_DIFFERENCING) + bytes(1024))
    with pytest.raises(ImagePolicyError, match="differencing VHD"):
        check_image(str(disk))


def test_a_truncated_qcow2_is_refused(images, no_commands):
    cluster = 1 << 16
    buf = bytearray(qcow2_header(l1_size=1, l1_offset=cluster)) + bytearray(2 * cluster)
    struct.pack_into(">Q", buf, cluster, 2 * cluster)
    struct.pack_into(">Q", buf, 2 * cluster, 50 * cluster)  # data far past the end
    (images / "x.qcow2").write_bytes(bytes(buf))
    with pytest.raises(CorruptImageError, match="truncated: the image refers to data up to"):
        check_image(str(images / "x.qcow2"))


# --------------------------------------------------------------------------- the top file


def test_missing_directory_device_and_unsupported(images, no_commands):
    with pytest.raises(ImageNotFoundError, match="no such file"):
        check_image(str(images / "nope.qcow2"))
    with pytest.raises(UnsupportedImageError, match="not a regular file"):
        check_image(str(images))
    os.mknod(images / "dev", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    with pytest.raises(ImagePolicyError, match="block device"):
        check_image(str(images / "dev"))
    (images / "x.qed").write_bytes(b"QED\0" + bytes(512))
    with pytest.raises(UnsupportedImageError, match="unsupported image format 'qed'"):
        check_image(str(images / "x.qed"))


def test_names_are_claims_checked_against_content(images, no_commands):
    qcow2_file(images / "x.vmdk")
    with pytest.raises(CorruptImageError, match="is a qcow2 image, not vmdk"):
        check_image(str(images / "x.vmdk"))
    # `.raw` is believed: a guest may have written a qcow2 header into its raw disk.
    qcow2_file(images / "guest.raw", backing=b"/etc/shadow")
    assert check_image(str(images / "guest.raw")).format == "raw"
    # `.img` is used for both: the content decides.
    qcow2_file(images / "cloud.img", size=1 << 20)
    assert check_image(str(images / "cloud.img")).format == "qcow2"
    # The caller that wrote the file knows best.
    assert check_image(str(images / "cloud.img"), fmt="raw").format == "raw"


def test_virtual_size_limit_comes_before_any_table_is_read(images, no_commands):
    qcow2_file(images / "big.qcow2", size=1 << 50, l1_size=1 << 21, l1_offset=1 << 16)
    with pytest.raises(ImageLimitError, match=r"1 PiB\), above the limit of 16 TiB"):
        check_image(str(images / "big.qcow2"), max_virtual_size=16 << 40)


# --------------------------------------------------------------------------- identities


def test_identity_changes_are_described(images):
    path = raw_file(images / "a.raw")
    recorded = FileIdentity.of(str(path), "image", os.lstat(path))
    assert describe_change(recorded, os.lstat(path)) is None
    os.truncate(path, 512)
    assert "changed size from 1048576 to 512" in (describe_change(recorded, os.lstat(path)) or "")
    path.unlink()
    assert describe_change(recorded, None) == f"image {path} is gone"
    path.symlink_to("/etc/shadow")
    assert "replaced by a symlink" in (describe_change(recorded, os.lstat(path)) or "")


def test_verify_unchanged_after_replacement_by_a_symlink(images, host):
    raw_file(images / "base.raw")
    top = qcow2_file(images / "x.qcow2", backing=b"base.raw", backing_format=b"raw", size=1 << 20)
    checked = check_image(str(top))
    checked.verify_unchanged()
    (images / "base.raw").unlink()
    (images / "base.raw").symlink_to(host / "secret")
    with pytest.raises(
        ImageChangedError, match=r"backing file .*base\.raw was replaced by a symlink"
    ):
        checked.verify_unchanged()


def test_file_identity_round_trips():
    identity = FileIdentity("/a", "extent", 1, 2, 3, 4, 0o600, "/b/../a")
    assert FileIdentity.from_dict(identity.to_dict()) == identity


# --------------------------------------------------------------------------- small parts


def test_policy_roots():
    policy = ImagePolicy.for_image("/data/vm/x.qcow2")
    assert not policy.configured
    assert policy.inside(os.path.realpath("/data/vm") + "/y")
    assert not policy.inside(os.path.realpath("/data/vm") + "x/y")
    assert ImagePolicy.for_image("/x", ["/"]).inside("/etc/shadow")


def test_qemu_filename_is_compact_json():
    layer_json = qemu_filename({"driver": "raw", "backing": None})
    assert layer_json == 'json:{"driver":"raw","backing":null}'


def test_layer_spec_without_backing_pins_null(images):
    raw_file(images / "base.raw")
    top = qcow2_file(images / "x.qcow2", backing=b"base.raw", backing_format=b"raw", size=1 << 20)
    assert layer_spec(check_image(str(top)).top, with_backing=False)["backing"] is None


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VMCRAFT_IMAGE_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("VMCRAFT_MAX_VIRTUAL_SIZE_GIB", "100")
    monkeypatch.setenv("VMCRAFT_MAX_PARTITIONS", "16")
    settings = CraftSettings.from_env()
    assert settings.image_roots == (f"{tmp_path}/a", f"{tmp_path}/b")
    assert settings.max_virtual_size == 100 * GIB
    assert settings.max_partitions == 16
    assert CraftSettings.from_env(max_partitions=3).max_partitions == 3
    # A caller that builds its own settings still gets the operator's roots and limits.
    assert CraftSettings(work_dir="/w").image_roots == settings.image_roots
    assert CraftSettings(work_dir="/w").max_partitions == 16
    monkeypatch.setenv("VMCRAFT_MAX_PARTITIONS", "lots")
    with pytest.raises(ValueError, match="VMCRAFT_MAX_PARTITIONS must be a whole number"):
        CraftSettings.from_env()


def test_settings_defaults(monkeypatch):
    for name in ("VMCRAFT_IMAGE_ROOTS", "VMCRAFT_MAX_VIRTUAL_SIZE_GIB", "VMCRAFT_MAX_PARTITIONS"):
        monkeypatch.delenv(name, raising=False)
    assert CraftSettings().image_roots == ()
    settings = CraftSettings.from_env({})
    assert settings.image_roots == ()
    assert settings.max_virtual_size == 16 * 1024 * GIB
    assert settings.max_partitions == 128
    with pytest.raises(ValueError, match="max_partitions"):
        CraftSettings(max_partitions=0)
