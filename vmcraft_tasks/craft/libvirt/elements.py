"""Declarative element pieces: every part of the domain is written as `el(...)` calls
that read like the XML they produce.

Attribute order is the order given (ElementTree keeps insertion order), None
attributes and None children are dropped, so optional parts are written inline
instead of as `if` blocks, and the same spec always serialises to the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from xml.etree import ElementTree as ET

AttrValue = str | int | None
Child = ET.Element | Iterable[ET.Element] | None

INDENT = "  "


def el(
    tag: str,
    attrs: Mapping[str, AttrValue] | None = None,
    *children: Child,
    text: str | None = None,
) -> ET.Element:
    """One element with its attributes, text and children; None anywhere means 'absent'."""
    element = ET.Element(tag, {k: str(v) for k, v in (attrs or {}).items() if v is not None})
    element.text = text
    for child in children:
        if child is None:
            continue
        if isinstance(child, ET.Element):
            element.append(child)
        else:
            element.extend(child)
    return element


def to_string(root: ET.Element) -> str:
    """Indented XML without a declaration, as `virsh dumpxml` prints it, newline-terminated."""
    ET.indent(root, space=INDENT)
    return ET.tostring(root, encoding="unicode") + "\n"
