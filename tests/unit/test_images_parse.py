import json

import pytest

from vmcraft_tasks.craft.errors import CorruptImageError, ImageNotFoundError, UnsupportedImageError
from vmcraft_tasks.craft.images import (
    classify_qemu_img_error,
    parse_backing_chain,
    parse_qemu_img_info,
    probe_image,
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
