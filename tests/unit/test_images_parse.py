import json

import pytest

from vmcraft_tasks.craft.errors import (
    CorruptImageError,
    ImageNotFoundError,
    ImagePolicyError,
    UnsupportedImageError,
)
from vmcraft_tasks.craft.imagecheck import FileIdentity
from vmcraft_tasks.craft.images import (
    ImageInfo,
    classify_qemu_img_error,
    file_differences,
    parse_backing_chain,
    parse_qemu_img_info,
    probe_image,
    vmdk_extent_names,
)


def test_parse_info_reads_format_size_and_backing():
    text = json.dumps(
        {"format": "qcow2", "virtual-size": 10485760, "full-backing-filename": "/b.qcow2"}
    )
    assert parse_qemu_img_info("x", text) == ("qcow2", 10485760, "/b.qcow2")


def test_parse_info_without_format_is_corrupt():
    with pytest.raises(CorruptImageError, match="no usable answer"):
        parse_qemu_img_info("x", "{}")


def test_parse_backing_chain_skips_the_top_image():
    text = json.dumps(
        [{"filename": "top.qcow2"}, {"filename": "mid.qcow2"}, {"filename": "base.raw"}]
    )
    assert parse_backing_chain(text) == ("mid.qcow2", "base.raw")


@pytest.mark.parametrize(
    ("stderr", "kind", "words"),
    [
        (
            "qemu-img: Could not open 'x.vmdk': "
            "Could not open 'x-flat.vmdk': No such file or directory",
            CorruptImageError,
            "referenced file is missing",
        ),
        (
            "qemu-img: Could not open 'x.vmdk': invalid VMDK image descriptor",
            CorruptImageError,
            "not a readable disk image",
        ),
        ("qemu-img: Unknown driver 'foo'", UnsupportedImageError, "unsupported image format"),
    ],
)
def test_classify_qemu_img_errors(stderr, kind, words):
    err = classify_qemu_img_error("/img/x.vmdk", stderr)
    assert isinstance(err, kind)
    assert words in str(err)
    assert err.image == "/img/x.vmdk"


def test_missing_file_fails_before_any_command(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such file"):
        probe_image(str(tmp_path / "absent.qcow2"))


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(UnsupportedImageError, match="not a regular file"):
        probe_image(str(tmp_path))


# --------------------------------------------------------------------------- ImageInfo


def _identity(path: str, inode: int = 2, size: int = 3, mtime: int = 4) -> FileIdentity:
    return FileIdentity(path, "image", 1, inode, size, mtime, 0o640)


def test_image_info_round_trips_its_files_and_graph():
    spec = {"driver": "raw", "file": {"driver": "file", "filename": "/d/a.raw"}, "backing": None}
    info = ImageInfo("/d/a.raw", "raw", 10, "id", (), (_identity("/d/a.raw"),), spec)
    again = ImageInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info
    assert (
        again.qemu_filename() == 'json:{"driver":"raw","file":{"driver":"file",'
        '"filename":"/d/a.raw"},"backing":null}'
    )


def test_an_unchecked_image_info_is_still_opened_pinned():
    """Records from before the check (or built by hand) never reach qemu as a bare name."""
    info = ImageInfo.from_dict({"path": "/d/x.qcow2", "format": "qcow2", "virtual_size": 1,
                                "identity": "i"})  # fmt: skip
    assert json.loads(info.qemu_filename()[5:]) == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/d/x.qcow2"},
        "backing": None,
    }


def test_mode_is_what_every_file_allows():
    files = (
        FileIdentity("/a", "image", 1, 1, 1, 1, 0o644),
        FileIdentity("/b", "backing file", 1, 2, 1, 1, 0o600),
    )
    assert ImageInfo("/a", "qcow2", 1, "i", files=files).mode == 0o600


def test_file_differences_name_what_changed():
    before = [_identity("/d/a"), _identity("/d/b")]
    now = [_identity("/d/a", size=9), _identity("/d/b", inode=7), _identity("/d/c")]
    assert file_differences(before, now) == [
        "/d/c is new in the image",
        "image /d/a changed size from 3 to 9 bytes",
        "image /d/b was replaced by another file",
    ]
    # Another host may see another device number for the same file.
    other_host = [FileIdentity("/d/a", "image", 99, 2, 3, 4, 0o640)]
    assert file_differences([_identity("/d/a")], other_host) == []


def test_vmdk_extent_names_from_qemu_img_info():
    info = {"format-specific": {"type": "vmdk", "data": {"extents": [{"filename": "/d/x"}]}}}
    assert vmdk_extent_names(info) == ["/d/x"]
    assert vmdk_extent_names({"format": "raw"}) is None


def test_a_device_refusal_from_qemu_is_a_policy_error():
    err = classify_qemu_img_error(
        "/i/x.vmdk", "qemu-img: Could not open 'x': 'file' driver requires '/dev/sda' to be a "
        "regular file"
    )  # fmt: skip
    assert isinstance(err, ImagePolicyError)
