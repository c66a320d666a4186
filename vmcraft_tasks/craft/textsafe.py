"""Guest text made safe to show, on a terminal or in a Markdown table cell (pure).

Everything read from a guest (os-release, hostnames, filesystem labels, fstab lines,
error messages quoting guest files) was written by whoever made the image. Printed as
is, an ESC byte starts a terminal escape sequence (recolour, move the cursor, set the
window title, on some terminals write files or answer back), a BEL or NUL misbehaves,
U+202E reverses what the reader sees, and `<script>` or `[x](http://...)` becomes
markup in a rendered summary.md. Every place that prints guest text goes through
these functions; JSON keeps the raw text (JSON escapes control characters itself).

Unsafe characters are shown as visible escapes (`\\x1b`, `\\u202e`), not dropped, so a
reader can tell that the guest held something odd and what it was.
"""

from __future__ import annotations

import re
import unicodedata

ELLIPSIS = "..."  # ASCII: a terminal in a non-UTF-8 locale must be able to print it

# Line breaks a one-line field turns into a space. Other vertical controls (VT, FF,
# NEL, U+2028/9) are escaped instead: they are not what a config file uses to end a
# line, so seeing them escaped tells the reader more.
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\t]")
# Candidates for escaping: anything outside printable ASCII (plus tab and newline,
# which the multi-line form keeps). Printable non-ASCII text passes the check below.
_CANDIDATE = re.compile(r"[^\x20-\x7e\t\n]")
# Unicode categories a terminal or viewer acts on instead of showing: Cc (C0, DEL,
# C1: 0x9b is a one-byte CSI on terminals that honour 8-bit controls), Cf (bidi
# overrides and isolates, zero-width characters, BOM, soft hyphen), Cs (lone
# surrogates: guest bytes that were not UTF-8, kept by surrogateescape, on which
# print() would raise), Zl/Zp (line and paragraph separators).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# Markdown and HTML markup. `<`, `>`, `&` become entities, which no renderer turns
# back into a tag; the rest get a backslash (CommonMark escapes any ASCII
# punctuation). The backslash comes first in the class so it is doubled before the
# escapes are added; a pipe must be escaped or it ends the table cell.
_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
# An underscore between two letters or digits cannot open or close emphasis
# (CommonMark's flanking rules), so `web_01` stays as typed; any other one is escaped.
_MD_SPECIAL = re.compile(r"[\\`*\[\]|~<>&]|(?<![^\W_])_|_(?![^\W_])")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        # surrogateescape's stand-in for the raw byte 0x80..0xff: show that byte.
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _shown(ch: str) -> str:
    if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
        return _escape_char(ch)
    return _escape_char(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch


def _escape(text: str) -> str:
    return _CANDIDATE.sub(lambda m: _shown(m.group(0)), text)


def _clip(text: str, max_len: int) -> str:
    """`_escape(text)` cut to at most `max_len` characters, never inside an escape."""
    head = _escape(text[: max_len + 1])
    if len(text) <= max_len and len(head) <= max_len:
        return head
    room = max(max_len - len(ELLIPSIS), 0)
    pieces: list[str] = []
    used = 0
    for ch in text[:room]:
        piece = _shown(ch) if _CANDIDATE.match(ch) else ch
        if used + len(piece) > room:
            break
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces) + ELLIPSIS


def for_terminal(text: object, *, multiline: bool = False, max_len: int | None = None) -> str:
    """`text` as it may be written to a terminal.

    One line by default: CR/LF/tab become a space, so a guest string cannot start a
    new line that looks like the tool's own output (or overwrite one with a lone CR).
    `multiline` keeps newlines and tabs (CRLF becomes LF; a lone CR is escaped).
    Every other control or format character is escaped. `max_len` bounds the result,
    ending it with "..." when cut.
    """
    value = text if isinstance(text, str) else str(text)
    value = value.replace("\r\n", "\n") if multiline else _LINE_BREAKS.sub(" ", value)
    if max_len is not None:
        return _clip(value, max_len)
    return _escape(value)


def _md_escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    return _MD_ENTITIES.get(ch, "\\" + ch)


def for_markdown_cell(text: object, *, max_len: int | None = None) -> str:
    """`text` as one Markdown table cell: one line, no markup, no control characters.

    Whitespace runs (newlines included) collapse to one space, since a newline would
    end the table row. The result is also safe on a terminal, where `vmcraft-tasks
    run` prints the summary. `max_len` bounds the text before the Markdown escapes.
    """
    value = " ".join((text if isinstance(text, str) else str(text)).split())
    value = for_terminal(value, max_len=max_len)
    return _MD_SPECIAL.sub(_md_escape, value)
