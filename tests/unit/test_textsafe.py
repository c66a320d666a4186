"""Guest text on terminals and in Markdown: control characters, bidi, markup, newlines."""

from __future__ import annotations

import io
import unicodedata
from typing import Any

import pytest

from scheduler import watch
from scheduler.progress import render_status
from vmcraft_tasks.craft.render import render_report
from vmcraft_tasks.craft.textsafe import ELLIPSIS, for_markdown_cell, for_terminal

# What a hostile os-release can hold: colour and cursor escapes, an OSC title/hyperlink
# sequence ended by BEL, a NUL, C1 controls (0x9b is an 8-bit CSI), an RTL override,
# a zero-width space, raw HTML and a fake second line.
HOSTILE = (
    "\x1b[31mDebian\x1b[0m \x1b]0;pwned\x07 \x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\"
    "\x00\x9b2J\x85\u202etxt.exe\u200b<script>alert(1)</script>\nroot@host:~# "
)


def _printable(text: str, *, newlines: bool = False) -> bool:
    allowed = "\n" if newlines else ""
    return all(ch in allowed or (ch.isprintable() and ch != "\t") for ch in text)


def _no_unsafe(text: str) -> bool:
    return not any(
        unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and ch != "\n" for ch in text
    )


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("bell\x07", "bell\\x07"),
        ("nul\x00byte", "nul\\x00byte"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),  # C1 CSI
        ("nel\x85", "nel\\x85"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # right-to-left override
        ("iso\u2066late\u2069", "iso\\u2066late\\u2069"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("line\u2028sep", "line\\u2028sep"),
        ("form\x0cfeed\x0bvt", "form\\x0cfeed\\x0bvt"),
    ],
)
def test_control_and_format_characters_are_shown_escaped(raw: str, shown: str) -> None:
    assert for_terminal(raw) == shown


def test_printable_text_passes_unchanged() -> None:
    text = "Debian GNU/Linux 12 (bookworm) — Übersicht 日本語 C:\\Windows émoji 🙂"
    assert for_terminal(text) == text
    assert for_terminal(for_terminal(HOSTILE)) == for_terminal(HOSTILE)  # idempotent


def test_undecodable_guest_bytes_show_as_the_bytes() -> None:
    raw = b"caf\xe9 \xff".decode("utf-8", errors="surrogateescape")
    shown = for_terminal(raw)
    assert shown == "caf\\xe9 \\xff"
    shown.encode("utf-8")  # print() would raise on a lone surrogate


def test_one_line_by_default_multiline_on_request() -> None:
    assert for_terminal("a\nb\r\nc\td\re") == "a b c d e"
    assert for_terminal("a\nb\r\nc\td\re", multiline=True) == "a\nb\nc\td\\x0de"


def test_hostile_text_cannot_reach_the_terminal() -> None:
    shown = for_terminal(HOSTILE)
    assert "\n" not in shown and _printable(shown) and _no_unsafe(shown)
    assert "\\x1b[31mDebian" in shown and "\\u202e" in shown


def test_max_len_cuts_without_splitting_an_escape() -> None:
    assert for_terminal("x" * 50, max_len=10) == "x" * 7 + ELLIPSIS
    cut = for_terminal("\x1b" * 40, max_len=18)
    assert cut == "\\x1b" * 3 + ELLIPSIS and len(cut) <= 18
    assert for_terminal("short", max_len=10) == "short"
    assert for_terminal("\x1b", max_len=4) == "\\x1b"


@pytest.mark.parametrize(
    ("raw", "cell"),
    [
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)&gt;"),
        ("AT&amp;T &copy;", "AT&amp;amp;T &amp;copy;"),
        ("a|b", "a\\|b"),
        ("C:\\|x", "C:\\\\\\|x"),  # the text's own backslash cannot un-escape the pipe
        ("`code`", "\\`code\\`"),
        ("[click](http://evil/)", "\\[click\\](http://evil/)"),
        ("![img](http://evil/x.png)", "!\\[img\\](http://evil/x.png)"),
        ("*bold* ~~gone~~", "\\*bold\\* \\~\\~gone\\~\\~"),
        ("_em_ __strong__", "\\_em\\_ \\_\\_strong\\_\\_"),
        ("web_01 db_02_x", "web_01 db_02_x"),  # an intraword underscore is no emphasis
        ("two\nlines\r\n  and   tabs\t", "two lines and tabs"),
        ("\x1b[2Jwiped", "\\\\x1b\\[2Jwiped"),  # escaped, and the escape's backslash kept
    ],
)
def test_markdown_cells(raw: str, cell: str) -> None:
    assert for_markdown_cell(raw) == cell


def test_markdown_cell_of_hostile_text_is_one_safe_line() -> None:
    cell = for_markdown_cell(HOSTILE)
    assert "\n" not in cell and _printable(cell) and _no_unsafe(cell)
    assert "<" not in cell and ">" not in cell
    # Every pipe is escaped, so the cell stays one cell.
    assert all(cell[i - 1] == "\\" for i, ch in enumerate(cell) if ch == "|")


def test_markdown_cell_max_len() -> None:
    cell = for_markdown_cell("<" * 1000, max_len=20)
    assert cell == "&lt;" * 17 + ELLIPSIS


# --- where guest text is printed ------------------------------------------------------


def _inspect_report(product: str, label: str, spec: str) -> dict[str, Any]:
    return {
        "image": {
            "path": "/data/web01.vmdk",
            "format": "vmdk",
            "virtual_size": 1 << 30,
            "backing_chain": ["base\x1b[2J.vmdk"],
        },
        "backend": "fuse",
        "attach_attempts": 1,
        "readonly": True,
        "partitions": [
            {"number": 1, "size_sectors": 2048, "sector_size": 512},
            {"number": 2, "size_sectors": 2048, "sector_size": 512},
        ],
        "filesystems": [
            {"partition": 1, "type": "ext4", "label": label, "uuid": "u-1"},
            {"partition": 2, "type": None, "content": f"unrecognised data {label}"},
        ],
        "mounts": {"1": {"ok": False, "error": f"mount: {label}: wrong fs type"}},
        "roots": [
            {
                "root_partition": 1,
                "type": "linux",
                "distro": "debian",
                "product_name": product,
                "major": 12,
                "minor": 0,
                "arch": "x86_64",
                "hostname": product,
                "package_format": "deb",
                "fstab": [
                    {"spec": spec, "mountpoint": "/srv", "resolved_partition": None, "kind": "x"}
                ],
                "notes": [f"cannot read /etc/{label}"],
            }
        ],
    }


def test_inspect_text_escapes_every_guest_value() -> None:
    plain = render_report(_inspect_report("Debian", "root", "/dev/sda1"))
    hostile = render_report(_inspect_report(HOSTILE, "lab\x1b]0;x\x07el\nfake", HOSTILE))
    assert _printable(hostile, newlines=True) and _no_unsafe(hostile)
    # No guest value added a line: the layout is the same as for a plain guest.
    assert hostile.count("\n") == plain.count("\n")
    assert "\\x1b[31mDebian" in hostile


def test_progress_lines_escape_reasons_ids_and_hosts() -> None:
    status = {
        "batch": "b1",
        "counts": {"failed": 1, "done": 1},
        "vms": [
            {"vm": "web01", "status": "failed", "host": "h\x1b[1A", "error": HOSTILE * 3},
            {"vm": "db\u202e01", "status": "done", "host": "h2"},
        ],
    }
    lines = render_status(status)
    assert len(lines) == 3
    for line in lines:
        assert _printable(line) and _no_unsafe(line)
    assert lines[1].endswith(ELLIPSIS)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Status:
    finished = True

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return self.data


def test_watch_redraw_writes_only_its_own_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        "batch": "b1",
        "counts": {"failed": 1},
        "vms": [{"vm": "x" * 300, "status": "failed", "host": "h", "error": HOSTILE}],
    }
    monkeypatch.setattr(watch, "batch_status", lambda _client, _batch: _Status(data))
    monkeypatch.setenv("COLUMNS", "80")
    out = _Tty()
    watch.watch_batch(object(), "b1", out=out)  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    # Each line fits the terminal, so a redraw moves up exactly the rows it drew.
    assert all(len(line) < 80 and _printable(line) for line in lines)
