"""The finished-conversion marker: real files, a fake converter, real qcow2 headers."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from vmcraft_tasks import conversions
from vmcraft_tasks.conversions import (
    ConversionMarker,
    ConversionSourceChangedError,
    already_converted,
    convert_confined,
    marker_name,
    output_checksum,
    rebind_conversion,
    stage_conversion,
)
from vmcraft_tasks.craft.images import disk_identity
from vmcraft_tasks.outfiles import ForeignFileError, OutputDir, OutputPathError

Convert = Callable[[str], Mapping[str, Any]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path.resolve() / "out"
    path.mkdir()
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path.resolve() / "src" / "web01.raw"
    path.parent.mkdir()
    path.write_bytes(b"\0" * 4096 + b"guest data")
    path.chmod(0o600)
    return path


@pytest.fixture
def target(root: Path) -> Path:
    return root / "wave-1" / "web01-disk0.qcow2"


def copying(content: bytes = b"converted disk") -> tuple[Convert, list[str]]:
    """A converter that writes `content` at the staged path, as qemu-img would."""
    calls: list[str] = []

    def convert(staged: str) -> Mapping[str, Any]:
        calls.append(staged)
        with open(staged, "wb") as fh:
            fh.write(content)
        return {"source": "ignored", "target": staged, "seconds": 1.0, "target_bytes": 4096}

    return convert, calls


def convert_once(source: Path, target: Path, root: Path) -> ConversionMarker:
    convert, _ = copying()
    return convert_confined(str(source), str(target), [str(root)], convert)


def test_a_conversion_is_published_marked_and_found_again(
    source: Path, target: Path, root: Path
) -> None:
    convert, calls = copying()
    marker = convert_confined(str(source), str(target), [str(root)], convert)
    (staged,) = calls
    assert os.path.dirname(staged) == str(target.parent)
    assert os.path.basename(staged).startswith(".web01-disk0.qcow2.")
    assert not os.path.exists(staged)
    assert target.read_bytes() == b"converted disk"
    # A 0600 source gives a 0600 disk; the marker is a 0640 report.
    assert target.stat().st_mode & 0o777 == 0o600
    marker_file = target.parent / marker_name(str(target))
    assert marker_file.stat().st_mode & 0o777 == 0o640
    assert marker.conversion["target"] == str(target)
    assert marker.conversion["source_identity"] == disk_identity(str(source))
    assert marker.target_identity.ino == target.stat().st_ino
    assert marker.checksum.startswith("sha256:")
    assert already_converted(str(source), str(target), [str(root)]) == marker


def test_a_wider_source_still_gives_at_most_0640(source: Path, target: Path, root: Path) -> None:
    source.chmod(0o666)
    convert_once(source, target, root)
    assert target.stat().st_mode & 0o777 == 0o640


def test_nothing_there_means_not_converted(source: Path, target: Path, root: Path) -> None:
    assert already_converted(str(source), str(target), [str(root)]) is None
    assert not target.parent.exists()  # looking creates nothing


def test_a_changed_source_means_convert_again(source: Path, target: Path, root: Path) -> None:
    convert_once(source, target, root)
    with open(source, "ab") as fh:
        fh.write(b"more")
    assert already_converted(str(source), str(target), [str(root)]) is None


def test_a_changed_output_means_convert_again(source: Path, target: Path, root: Path) -> None:
    convert_once(source, target, root)
    with open(target, "ab") as fh:
        fh.write(b"edited")
    assert already_converted(str(source), str(target), [str(root)]) is None
    # ... and converting again replaces the tool's own files.
    marker = convert_once(source, target, root)
    assert already_converted(str(source), str(target), [str(root)]) == marker


def test_an_edit_with_the_identity_put_back_is_caught_by_the_checksum(
    source: Path, target: Path, root: Path
) -> None:
    convert_once(source, target, root)
    st = target.stat()
    with open(target, "r+b") as fh:
        fh.write(b"C")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert already_converted(str(source), str(target), [str(root)]) is None


def test_a_deleted_output_means_convert_again(source: Path, target: Path, root: Path) -> None:
    convert_once(source, target, root)
    os.unlink(target)
    assert already_converted(str(source), str(target), [str(root)]) is None


def test_a_planted_marker_for_a_planted_disk_is_refused(
    source: Path, target: Path, root: Path
) -> None:
    """The attack: a marker the tool did not write must never count, whatever it says."""
    target.parent.mkdir()
    target.write_bytes(b"planted qcow2")
    st = target.stat()
    planted = {
        "marker_version": 1,
        "source": str(source),
        "source_identity": disk_identity(str(source)),
        "target": str(target),
        "target_identity": {
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
        "checksum": "sha256:whatever",
        "conversion": {},
    }
    marker_file = target.parent / marker_name(str(target))
    marker_file.write_text(json.dumps(planted))
    with pytest.raises(ForeignFileError, match=r"web01-disk0\.qcow2 exists and was not made"):
        already_converted(str(source), str(target), [str(root)])


def test_an_old_style_marker_is_refused_too(source: Path, target: Path, root: Path) -> None:
    convert_once(source, target, root)
    marker_file = target.parent / marker_name(str(target))
    os.unlink(marker_file)
    marker_file.write_text(json.dumps({"source_identity": disk_identity(str(source))}))
    with pytest.raises(ForeignFileError, match=r"\.vmcraft\.json exists and was not made"):
        already_converted(str(source), str(target), [str(root)])


def test_a_symlink_at_the_marker_name_is_refused_and_not_followed(
    source: Path, target: Path, root: Path, tmp_path: Path
) -> None:
    host_file = tmp_path / "host-secret"
    host_file.write_text("secret")
    target.parent.mkdir()
    (target.parent / marker_name(str(target))).symlink_to(host_file)
    with pytest.raises(ForeignFileError, match="a symlink"):
        already_converted(str(source), str(target), [str(root)])
    convert, calls = copying()
    with pytest.raises(ForeignFileError, match="a symlink"):
        convert_confined(str(source), str(target), [str(root)], convert)
    assert calls == []  # refused before hours of copying
    assert host_file.read_text() == "secret"


def test_a_planted_disk_is_refused_before_converting(
    source: Path, target: Path, root: Path
) -> None:
    target.parent.mkdir()
    target.write_bytes(b"the operator's disk")
    convert, calls = copying()
    with pytest.raises(ForeignFileError, match=r"web01-disk0\.qcow2 exists"):
        convert_confined(str(source), str(target), [str(root)], convert)
    assert calls == []
    assert target.read_bytes() == b"the operator's disk"


def test_a_disk_planted_during_the_conversion_is_not_replaced(
    source: Path, target: Path, root: Path
) -> None:
    def convert(staged: str) -> Mapping[str, Any]:
        Path(staged).write_bytes(b"ours")
        target.write_bytes(b"planted meanwhile")
        return {}

    with pytest.raises(ForeignFileError):
        convert_confined(str(source), str(target), [str(root)], convert)
    assert target.read_bytes() == b"planted meanwhile"
    assert not [p for p in os.listdir(target.parent) if p.endswith(".tmp")]


def test_a_failed_conversion_leaves_no_staged_file(source: Path, target: Path, root: Path) -> None:
    def convert(staged: str) -> Mapping[str, Any]:
        Path(staged).write_bytes(b"half")
        raise RuntimeError("qemu-img died")

    with pytest.raises(RuntimeError, match="qemu-img died"):
        convert_confined(str(source), str(target), [str(root)], convert)
    assert os.listdir(target.parent) == []


def test_a_source_changed_during_the_conversion_is_not_kept(
    source: Path, target: Path, root: Path
) -> None:
    def convert(staged: str) -> Mapping[str, Any]:
        Path(staged).write_bytes(b"copy")
        with open(source, "ab") as fh:
            fh.write(b"written by a running VM")
        return {}

    with pytest.raises(ConversionSourceChangedError, match="changed during its conversion"):
        convert_confined(str(source), str(target), [str(root)], convert)
    assert not target.exists()


def test_a_target_outside_the_roots_is_refused(source: Path, tmp_path: Path, root: Path) -> None:
    with pytest.raises(OutputPathError, match="outside the output roots"):
        stage_conversion(str(tmp_path / "elsewhere" / "x-disk0.qcow2"), [str(root)])


def test_rebind_keeps_a_disk_the_tool_itself_changed(
    source: Path, target: Path, root: Path
) -> None:
    convert_once(source, target, root)
    with open(target, "ab") as fh:
        fh.write(b"fstab fixed")  # the fix step, through the attached disk
    assert already_converted(str(source), str(target), [str(root)]) is None
    rebound = rebind_conversion(str(source), str(target), [str(root)])
    assert rebound is not None
    assert already_converted(str(source), str(target), [str(root)]) == rebound


def test_rebind_without_a_marker_does_nothing(source: Path, target: Path, root: Path) -> None:
    target.parent.mkdir()
    assert rebind_conversion(str(source), str(target), [str(root)]) is None


# --- the checksum -------------------------------------------------------------------


def qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True, timeout=30
    )
    return path


def checksum_of(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return output_checksum(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_large_qcow2_hashes_its_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversions, "FULL_HASH_MAX_BYTES", 0)
    image = qcow2(tmp_path / "x.qcow2")
    first = checksum_of(image)
    assert first.startswith("qcow2-meta-sha256:")
    # Appended data past the metadata does not change it ...
    with open(image, "ab") as fh:
        fh.write(b"x" * 65536)
    assert checksum_of(image) == first
    # ... a rewritten header (say, a data file added) does.
    with open(image, "r+b") as fh:
        fh.seek(200)
        fh.write(b"data-file")
    assert checksum_of(image) != first


def test_large_raw_is_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversions, "FULL_HASH_MAX_BYTES", 0)
    raw = tmp_path / "x.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 << 20)
    first = checksum_of(raw)
    assert first.startswith("sampled-sha256:")
    with open(raw, "r+b") as fh:
        fh.write(b"boot sector changed")
    assert checksum_of(raw) != first


def test_small_files_are_hashed_whole(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "x.qcow2", "1M")
    assert checksum_of(image).startswith("sha256:")


def test_markers_are_only_read_from_the_ledger(source: Path, target: Path, root: Path) -> None:
    convert_once(source, target, root)
    with OutputDir.open(str(target.parent), [str(root)]) as out:
        assert out.is_own(marker_name(str(target)))
        assert out.is_own(target.name)
