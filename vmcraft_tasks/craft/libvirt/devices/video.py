"""<video>: the display adapter behind the graphics console."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from vmcraft_tasks.craft.libvirt.elements import el
from vmcraft_tasks.craft.libvirt.spec import VideoModel


def element(model: VideoModel) -> ET.Element:
    return el("video", None, el("model", {"type": model, "heads": 1, "primary": "yes"}))
