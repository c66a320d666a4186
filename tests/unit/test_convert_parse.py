"""Pure parts of the converter, and the streaming runner on small shell commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vmcraft_tasks.craft import commands
from vmcraft_tasks.craft.commands import run_streaming, split_output
from vmcraft_tasks.craft.convert import (
    CheckReport,
    ConversionResult,
    convert_argv,
    convert_image,
    parse_check,
    parse_progress,
    target_mode,
    temp_path_for,
)
from vmcraft_tasks.craft.errors import CommandError
from vmcraft_tasks.craft.imagecheck import FileIdentity
from vmcraft_tasks.craft.images import ImageInfo

# --------------------------------------------------------------------------- parse_progress


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        ("    (0.00/100%)", 0.0),
        ("    (12.34/100%)\r", 12.34),
        ("(100.00/100%)", 100.0),
        ("    (1.00/100%)\r    (2.50/100%)\r", 2.5),  # several in one read: the latest
        ("  ( 7.00/100%)", 7.0),
        ("", None),
        ("qemu-img: error while reading sector 2048", None),
        ("(12.34/200%)", None),
        ("(abc/100%)", None),
    ],
)
def test_parse_progress(chunk, expected):
    assert parse_progress(chunk) == expected


def test_parse_progress_clamps_to_a_percentage():
    assert parse_progress("(100.01/100%)") == 100.0


# --------------------------------------------------------------------------- parse_check


def test_parse_check_clean_report():
    text = (
        '{"image-end-offset": 8716288, "total-clusters": 1024, "check-errors": 0, '
        '"allocated-clusters": 128, "filename": "b.qcow2", "format": "qcow2"}'
    )
    report = parse_check(text)
    assert report == CheckReport(corruptions=0, leaks=0, check_errors=0)
    assert report.ok


def test_parse_check_leaks_are_not_corruption():
    report = parse_check('{"check-errors": 0, "leaks": 3, "corruptions": 0}')
    assert report.leaks == 3
    assert report.ok


def test_parse_check_corruption_is_not_ok():
    assert not parse_check('{"check-errors": 0, "corruptions": 2}').ok
    assert not parse_check('{"check-errors": 1}').ok


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"leaks": 1}'])
def test_parse_check_refuses_other_text(text):
    with pytest.raises(ValueError, match="not a qemu-img check report"):
        parse_check(text)


# --------------------------------------------------------------------------- argv, names, result


def test_convert_argv_names_the_source_format_and_streams_progress():
    argv = convert_argv("/d/a.vmdk", "vmdk", "/o/a.qcow2.part-1", "qcow2")
    assert argv == [
        "qemu-img",
        "convert",
        "-p",
        "-f",
        "vmdk",
        "-O",
        "qcow2",
        "/d/a.vmdk",
        "/o/a.qcow2.part-1",
    ]
    assert "-U" not in argv  # never read an image a running VM holds for writing


def test_temp_path_is_next_to_the_target():
    temp = temp_path_for("/out/web01.qcow2", "ab12")
    assert temp == "/out/web01.qcow2.part-ab12"
    assert os.path.dirname(temp) == "/out"


def test_result_to_dict_is_plain_data():
    result = ConversionResult(
        source="/d/a.vmdk",
        target="/o/a.qcow2",
        source_format="vmdk",
        target_format="qcow2",
        virtual_size=10,
        target_bytes=4096,
        seconds=0.5,
        checked=True,
        source_unchanged=True,
        notes=("n",),
    )
    assert result.to_dict() == {
        "source": "/d/a.vmdk",
        "target": "/o/a.qcow2",
        "source_format": "vmdk",
        "target_format": "qcow2",
        "virtual_size": 10,
        "target_bytes": 4096,
        "seconds": 0.5,
        "checked": True,
        "source_unchanged": True,
        "notes": ["n"],
        "target_file": None,
    }
    made = FileIdentity("/o/a.qcow2", "output", 1, 2, 3, 4, 0o600)
    with_file = ConversionResult(**{**result.__dict__, "target_file": made})
    assert with_file.to_dict()["target_file"] == made.to_dict()
    assert json.loads(json.dumps(with_file.to_dict()))["target_file"]["inode"] == 2


def test_unknown_target_format_is_refused_before_anything_runs(tmp_path):
    before = commands.STATS.total()
    with pytest.raises(ValueError, match="target_format must be one of qcow2, raw"):
        convert_image(str(tmp_path / "a.raw"), str(tmp_path / "b.vmdk"), target_format="vmdk")
    assert commands.STATS.total() == before


# --------------------------------------------------------------------------- split_output


@pytest.mark.parametrize(
    ("buffer", "pieces", "rest"),
    [
        ("a\rb\n", ["a", "b"], ""),
        ("a\r\nb", ["a"], "b"),
        ("\r\r\n", [], ""),
        ("partial", [], "partial"),
        ("  (1.00/100%)\r  (2.", ["  (1.00/100%)"], "  (2."),
    ],
)
def test_split_output(buffer, pieces, rest):
    assert split_output(buffer) == (pieces, rest)


# --------------------------------------------------------------------------- run_streaming


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_run_streaming_splits_on_cr_and_lf():
    seen: list[str] = []
    result = run_streaming(_sh(r'printf "a\rb\nc\r\nd"'), on_output=seen.append, timeout=10)
    assert seen == ["a", "b", "c", "d"]  # the unterminated last piece arrives at EOF
    assert result.returncode == 0
    assert result.stdout == "a\rb\nc\r\nd"


def test_run_streaming_delivers_output_as_it_arrives():
    arrivals: list[tuple[str, float]] = []
    started = time.monotonic()
    run_streaming(
        _sh(r'printf "first\r"; sleep 0.5; printf "second\n"'),
        on_output=lambda piece: arrivals.append((piece, time.monotonic() - started)),
        timeout=10,
    )
    assert [piece for piece, _ in arrivals] == ["first", "second"]
    assert arrivals[0][1] < 0.4  # not held back until the command ends
    assert arrivals[1][1] >= 0.5


def test_run_streaming_failure_carries_exit_code_and_stderr():
    seen: list[str] = []
    with pytest.raises(CommandError) as info:
        run_streaming(
            _sh(r'printf "a\rb\n"; echo "first" >&2; echo "disk read error" >&2; exit 3'),
            on_output=seen.append,
            timeout=10,
        )
    err = info.value
    assert seen == ["a", "b"]
    assert err.returncode == 3
    assert not err.timed_out
    assert "disk read error" in err.stderr
    assert err.stderr_tail == "first | disk read error"
    assert err.argv[0] == "sh"
    assert "exit 3" in str(err)


def test_run_streaming_ok_codes_and_no_check():
    assert run_streaming(_sh("exit 3"), on_output=print, ok_codes=(0, 3)).returncode == 3
    assert run_streaming(_sh("exit 5"), on_output=print, check=False).returncode == 5


def test_run_streaming_keeps_only_the_tail_of_a_long_stderr():
    line = "line-$i-" + "x" * 34
    script = f"i=0; while [ $i -lt 3000 ]; do echo {line} >&2; i=$((i+1)); done; exit 1"
    with pytest.raises(CommandError) as info:
        run_streaming(_sh(script), on_output=print, timeout=30)
    assert len(info.value.stderr) <= commands.STREAMING_STDERR_KEEP
    assert info.value.stderr.rstrip().endswith("line-2999-" + "x" * 34)


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that is not us."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_dead(pid: int, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        time.sleep(0.02)
    return _dead(pid)


def test_run_streaming_timeout_kills_the_command_and_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        run_streaming(
            _sh(f'printf "started\\n"; sleep 30 & echo $! > {pidfile}; wait'),
            on_output=seen.append,
            timeout=0.5,
        )
    assert time.monotonic() - started < 5
    assert info.value.timed_out
    assert info.value.returncode is None
    assert "timed out" in str(info.value)
    assert seen == ["started"]
    assert _wait_dead(int(pidfile.read_text()))


def test_run_streaming_timeout_also_covers_a_command_that_closes_its_pipes(tmp_path):
    with pytest.raises(CommandError) as info:
        run_streaming(_sh("exec >/dev/null 2>&1; sleep 30"), on_output=print, timeout=0.5)
    assert info.value.timed_out


def test_run_streaming_kills_the_command_when_the_callback_raises(tmp_path):
    pidfile = tmp_path / "sh.pid"

    class Interrupted(BaseException):
        pass

    def on_output(piece: str) -> None:
        raise Interrupted(piece)

    with pytest.raises(Interrupted):
        run_streaming(
            _sh(f'echo $$ > {pidfile}; printf "x\\n"; sleep 30'), on_output=on_output, timeout=30
        )
    assert _wait_dead(int(pidfile.read_text()))


def test_run_streaming_missing_program():
    with pytest.raises(CommandError, match="program not found"):
        run_streaming(["/nonexistent/vmcraft-no-such-tool"], on_output=print)


def test_run_streaming_is_counted_and_observed():
    seen: list[list[str]] = []
    remove = commands.add_observer(lambda argv: seen.append(list(argv)))
    before = commands.STATS.counts["sh"]
    try:
        run_streaming(_sh("true"), on_output=print)
    finally:
        remove()
    assert seen == [["sh", "-c", "true"]]
    assert commands.STATS.counts["sh"] == before + 1


def test_run_streaming_decodes_utf8_split_across_reads():
    seen: list[str] = []
    # "é" is two bytes; the pause makes them arrive in two reads.
    run_streaming(_sh(r'printf "\303"; sleep 0.2; printf "\251\n"'), on_output=seen.append)
    assert seen == ["é"]


def test_run_timeout_kills_the_command_and_its_children(tmp_path):
    from vmcraft_tasks.craft.commands import run

    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        run(_sh(f"echo oops >&2; sleep 30 & echo $! > {pidfile}; wait"), timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.timed_out and "oops" in info.value.stderr
    assert _wait_dead(int(pidfile.read_text()))


# --------------------------------------------------------------------------- target mode


@pytest.mark.parametrize(
    ("modes", "expected"),
    [((0o600,), 0o600), ((0o644,), 0o640), ((0o666,), 0o640), ((0o644, 0o600), 0o600),
     ((0o400,), 0o400), ((0o755,), 0o640)],
)  # fmt: skip
def test_target_mode_never_exceeds_the_source_or_0640(modes, expected):
    files = tuple(
        FileIdentity(f"/s/{i}", "image", 1, i, 1, 1, mode) for i, mode in enumerate(modes)
    )
    assert target_mode(ImageInfo("/s/0", "raw", 1, "i", files=files)) == expected
