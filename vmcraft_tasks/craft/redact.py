"""Secrets in guest config text replaced by `<redacted>` before a report holds them (pure).

The fixes record every file they look at, before and after, and those records end up
in JSON reports on disk and in the Redis job record. The same files hold the guest's
secrets: Wi-Fi pre-shared keys, 802.1x and VPN passwords, IPsec keys, CIFS passwords in
fstab options. `redact_text` and `redact_line` replace each secret value with
`<redacted>` and keep everything else, line for line, so a reader still sees which
file changed and how. Only the record is redacted: the fix writes the real text.

What counts as a secret (the key names are matched case-insensitively, `-` and `_`
alike, on the last dotted component):

- a key whose name contains pass, psk, secret, token, private-key or preshared-key
  (password, passwd, passphrase, wpa-psk, WPA_PSK, IKE_PSK, leap-password,
  private-key-password, wireguard's private-key and preshared-key, ...); a key whose
  name ends in pw/pwd (rootpw); pin and *-pin; macsec's *-cak; WEP keys (key, key1,
  wep-key0..3, wep_key0); ifcfg's KEY_* (IPsec keys);
- but not a key that only describes a secret: *-flags, *-type, *-mgmt, *-management,
  *-file, *-path (NetworkManager's psk-flags, ifcfg's KEY_MGMT);
- every key of a NetworkManager `[vpn-secrets]` section;
- the password of a URL (`scheme://user:password@host`).

Forms understood: `key=value` at the start of a line (NetworkManager keyfiles,
wpa_supplicant.conf, ifcfg, shell; commented out too) and inside a line (fstab options,
kernel command lines, URL queries); YAML `key: value` (netplan, block and flow style,
values continued on more-indented lines or in block scalars); `key value` (ifupdown's
`wpa-psk`, GRUB's `password`). A value left open at the end of its line (an open
quote, a trailing backslash, a YAML continuation) is redacted on the lines that
continue it. Each value found this way is also replaced wherever else it appears in
the same record (when it is at least `MIN_ECHOED_SECRET` characters long).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

REDACTED = "<redacted>"
# Shorter values are redacted where they are assigned but not hunted elsewhere in the
# text: replacing every "1234" or "yes" of a file would garble it.
MIN_ECHOED_SECRET = 6
# A bound on the alternation built from the values found in one record.
MAX_ECHOED_SECRETS = 64
# YAML documents are walked for secret keys up to this many nodes (aliases can make a
# small document a huge graph).
_MAX_YAML_NODES = 20000

_SECRET_WORD = re.compile(r"pass|psk|secret|token|private_?key|preshared_?key")
_SECRET_NAME = re.compile(r"\w*pwd?|(?:\w*_)?(?:pin|cak)|\w*wep_?key\d*|key\d*")
_SHELL_KEY = re.compile(r"KEY_\w+")  # ifcfg keys-* files: KEY_AH_IN, KEY_ESP_OUT, ...
_METADATA = re.compile(r"\w*_(?:flags|type|mgmt|management|file|path)")
_SECRET_SECTIONS = frozenset({"vpn-secrets"})

_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
# key=value at the start of a line, possibly commented out or exported.
_ASSIGN = re.compile(r"^(\s*(?:[#;]+\s*)?(?:export\s+)?)([\w.-]+)(\s*=\s*)(.*)$")
# In a [vpn-secrets] section every key is a secret, and plugins name them with spaces
# ("IPSec secret", "Xauth password").
_ASSIGN_SPACED = re.compile(r"^(\s*(?:[#;]+\s*)?)([^=#;\[\]]*?[^\s=#;\[\]])(\s*=\s*)(.*)$")
# YAML block mapping key (plain or quoted), possibly a list item or commented out. The
# list markers are matched possessively (`*+`): given back one by one, each would start
# a new scan of the line, which is quadratic on a line of "- - - ...".
_YAML_KEY = re.compile(
    r"^(\s*+(?:#+\s*)?(?:-\s+)*+)"
    r"(?:([\"'])(.+?)\2|([^\s\"'#:{}\[\],=][^:#=]*?))"
    r"\s*:(?:[ \t]+(.*))?$"
)
# `key value` at the start of a line (ifupdown, GRUB), possibly commented out.
_SPACED = re.compile(r"^(\s*(?:[#;]+\s*)?)([A-Za-z_][\w.-]*)([ \t]+)([^=:\s].*)$")
# YAML flow mapping pairs: {password: x, "psk": 'y'}
_FLOW_KEY = re.compile(
    r"([{,]\s*)(?:([\"'])([^\"']{1,256})\2|([^\s\"'{}\[\],:#][^{}\[\],:]*?))\s*:\s*"
)
# name=value anywhere in a line: fstab options, kernel arguments, URL queries.
_INLINE = re.compile(r"(?<![\w.-])([A-Za-z_][\w.-]*)=")
_INLINE_STOPS = " \t,;&\"')]}"
# The lookbehind keeps the search linear: without it every position of a long run of
# scheme characters would start a new scan to the end of the line.
_URL_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)([^\s/@]+)(@)"
)


def is_secret_key(name: str) -> bool:
    """Whether a config key names a secret (see the module docstring)."""
    raw = name.strip().strip("\"'")
    # Dotted paths (netplan change lines: network.wifis.wl0.auth.password) and
    # NetworkManager's dotted names end with the key itself.
    last = raw.rsplit(".", 1)[-1]
    key = last.lower().replace("-", "_")
    if not key or _METADATA.fullmatch(key):
        return False
    if _SECRET_WORD.search(key) or _SECRET_NAME.fullmatch(key):
        return True
    return _SHELL_KEY.fullmatch(last) is not None


@dataclass(frozen=True)
class _Open:
    """A secret value that goes on past the end of its line."""

    kind: str  # "quote": until the closing quote; "indent": more-indented lines;
    # "backslash": while lines end with a backslash
    quote: str = ""
    indent: int = 0


def _value_end(line: str, start: int, stops: str) -> tuple[int, str | None]:
    """Where the value starting at `start` ends, and the quote it leaves open, if any."""
    if start >= len(line):
        return start, None
    quote = line[start]
    if quote in "\"'":
        i = start + 1
        while i < len(line):
            ch = line[i]
            if quote == '"' and ch == "\\":
                i += 2
                continue
            if ch == quote:
                if quote == "'" and line[i + 1 : i + 2] == "'":  # YAML's '' inside '...'
                    i += 2
                    continue
                return i + 1, None
            i += 1
        return len(line), quote
    i = start
    while i < len(line) and line[i] not in stops:
        i += 1
    return i, None


def _note(found: set[str], value: str) -> None:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if value and value != REDACTED:
        found.add(value)


def _continued(value: str) -> _Open | None:
    if value[:1] in ("'", '"') and _value_end(value, 0, "")[1] is not None:
        return _Open("quote", quote=value[0])
    if value.rstrip().endswith("\\"):
        return _Open("backslash")
    return None


def _rest_of_line(prefix: str, value: str, found: set[str]) -> tuple[str, _Open | None]:
    """`prefix` + the redacted `value` that runs to the end of the line."""
    _note(found, value)
    more = _continued(value)
    # A trailing backslash stays: it shows the reader that the value goes on.
    tail = "\\" if more is not None and more.kind == "backslash" else ""
    return prefix + REDACTED + tail, more


def _pairs(line: str, pattern: re.Pattern[str], name_of: Any, stops: str, found: set[str]) -> str:
    """Redact the value after every match of `pattern` whose key is a secret."""
    out: list[str] = []
    pos = 0
    search_from = 0
    while (match := pattern.search(line, search_from)) is not None:
        start = match.end()
        # Only a secret's value is measured: measuring every value would be quadratic
        # on a line of "a=a=a=...". Otherwise the search goes on inside the value, since
        # GRUB_CMDLINE_LINUX="... rootpw=x" is a harmless key holding a secret one.
        search_from = max(start, search_from + 1)
        if not is_secret_key(name_of(match)):
            continue
        end, _open = _value_end(line, start, stops)
        value = line[start:end].rstrip()
        if value and not value.startswith(REDACTED):
            _note(found, value)
            out.append(line[pos:start] + REDACTED)
            pos = start + len(value)
            search_from = max(pos, search_from)
    out.append(line[pos:])
    return "".join(out)


def _yaml_block(line: str, found: set[str]) -> tuple[str, _Open | None] | None:
    match = _YAML_KEY.match(line)
    if match is None or not is_secret_key(match.group(3) or match.group(4) or ""):
        return None
    column = len(match.group(1))
    value = match.group(5) or ""
    if not value.strip():
        # The value, if any, is on the lines below, indented deeper.
        return line, _Open("indent", indent=column)
    if value.startswith(REDACTED):
        return line, None
    start = match.start(5)
    if value[0] in "\"'":
        end, open_quote = _value_end(line, start, "")
        _note(found, line[start:end])
        if open_quote is not None:
            return line[:start] + REDACTED, _Open("quote", quote=open_quote)
        return line[:start] + REDACTED + line[end:], None
    if value[0] in "|>":
        # A block scalar: the indicator is structure, the value is the lines below.
        return line, _Open("indent", indent=column)
    # A plain scalar may go on over more-indented lines.
    _note(found, value)
    return line[:start] + REDACTED, _Open("indent", indent=column)


def _redact(line: str, found: set[str], *, every_key: bool) -> tuple[str, _Open | None]:
    """One line with its secret values redacted, and what stays open after it."""
    assign = (_ASSIGN_SPACED if every_key else _ASSIGN).match(line)
    if assign is not None and (every_key or is_secret_key(assign.group(2))):
        value = assign.group(4)
        if value.strip() and not value.startswith(REDACTED):
            return _rest_of_line(line[: assign.start(4)], value, found)
        return line, None
    if assign is None:
        block = _yaml_block(line, found)
        if block is not None:
            return block
        spaced = _SPACED.match(line)
        if spaced is not None and is_secret_key(spaced.group(2)):
            value = spaced.group(4)
            if not value.startswith(REDACTED):
                return _rest_of_line(line[: spaced.start(4)], value, found)
    if "{" in line:
        line = _pairs(line, _FLOW_KEY, lambda m: m.group(3) or m.group(4), ",}]", found)
    line = _pairs(line, _INLINE, lambda m: m.group(1), _INLINE_STOPS, found)
    return _url_passwords(line, found), None


def _url_passwords(line: str, found: set[str]) -> str:
    def hide(match: re.Match[str]) -> str:
        if match.group(2) == REDACTED:
            return match.group(0)
        found.add(match.group(2))
        return match.group(1) + REDACTED + match.group(3)

    return _URL_PASSWORD.sub(hide, line)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _continue(line: str, state: _Open, found: set[str]) -> tuple[str, _Open | None] | None:
    """A line that continues an open secret, redacted; None when it does not continue it."""
    indent = line[: _indent_of(line)]
    if state.kind == "indent":
        if not line.strip():
            return line, state
        if len(indent) <= state.indent:
            return None
        _note(found, line)
        return indent + REDACTED, state
    if state.kind == "quote":
        end = _closing_quote(line, state.quote)
        if end is None:
            _note(found, line)
            return (indent + REDACTED if line.strip() else line), state
        _note(found, line[:end])
        return indent + REDACTED + line[end:], None
    _note(found, line)
    more = state if line.rstrip().endswith("\\") else None
    return indent + REDACTED + ("\\" if more else ""), more


def _closing_quote(line: str, quote: str) -> int | None:
    i = 0
    while i < len(line):
        if quote == '"' and line[i] == "\\":
            i += 2
            continue
        if line[i] == quote:
            if quote == "'" and line[i + 1 : i + 2] == "'":
                i += 2
                continue
            return i
        i += 1
    return None


def _yaml_secrets(text: str) -> set[str]:
    """String values under secret keys anywhere in a YAML document."""
    try:
        data = yaml.safe_load(text)
    except Exception:  # any parse failure (or a hostile nesting depth): nothing extra
        return set()
    found: set[str] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    seen: set[int] = set()
    visited = 0
    while stack and visited < _MAX_YAML_NODES:
        node, secret = stack.pop()
        visited += 1
        if isinstance(node, dict | list):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, dict):
                stack.extend((v, secret or is_secret_key(str(k))) for k, v in node.items())
            else:
                stack.extend((v, secret) for v in node)
        elif secret and node is not None and not isinstance(node, bool):
            for part in str(node).splitlines():
                _note(found, part)
    return found


def _echoes(values: Iterable[str]) -> re.Pattern[str] | None:
    usable = {v for v in values if len(v) >= MIN_ECHOED_SECRET and "\n" not in v}
    usable.discard(REDACTED)
    if not usable:
        return None
    # Longest first, so a secret that contains another is replaced whole.
    chosen = sorted(usable, key=lambda v: (-len(v), v))[:MAX_ECHOED_SECRETS]
    return re.compile("|".join(re.escape(v) for v in chosen))


def _replace(text: str, pattern: re.Pattern[str] | None) -> str:
    return text if pattern is None else pattern.sub(REDACTED, text)


def _redact_lines(text: str) -> tuple[str, set[str]]:
    found: set[str] = set()
    out: list[str] = []
    section = ""
    state: _Open | None = None
    # Split on LF only: a value holding a form feed or U+2028 is still one line to the
    # guest's parser, and splitting there would leave its second half unredacted.
    for raw in text.split("\n"):
        line, cr = (raw[:-1], "\r") if raw.endswith("\r") else (raw, "")
        if state is not None:
            continued = _continue(line, state, found)
            if continued is not None:
                line, state = continued
                out.append(line + cr)
                continue
            state = None
        if header := _SECTION.match(line):
            section = header.group(1).strip().lower()
        line, state = _redact(line, found, every_key=section in _SECRET_SECTIONS)
        out.append(line + cr)
    return "\n".join(out), found


def secret_values(text: str, *, path: str | None = None) -> frozenset[str]:
    """The secret values `redact_text` would hide in `text` (to hide them elsewhere too)."""
    _redacted, found = _redact_lines(text)
    if path is not None and path.endswith((".yaml", ".yml")):
        found |= _yaml_secrets(text)
    return frozenset(found)


def redact_text(text: str, *, path: str | None = None, values: Iterable[str] = ()) -> str:
    """`text` (a whole guest file) with every secret value replaced by `<redacted>`.

    Line count and line endings are kept. `path`, the guest path, lets YAML files be
    parsed for secrets too. `values` are more secrets (found in another text of the same
    record) to hide wherever they appear.
    """
    redacted, found = _redact_lines(text)
    if path is not None and path.endswith((".yaml", ".yml")):
        found |= _yaml_secrets(text)
    return _replace(redacted, _echoes([*found, *values]))


def redact_line(line: str, *, values: Iterable[str] = ()) -> str:
    """One line (a Change's before/after, a skip reason) with its secrets redacted."""
    found: set[str] = set()
    redacted, _state = _redact(line, found, every_key=False)
    return _replace(redacted, _echoes([*found, *values]))
