"""Checks on what clients send, with errors that name what was wrong."""

from __future__ import annotations

import os
from collections.abc import Sequence


def validate_image_path(path: str, roots: Sequence[str]) -> str:
    """An absolute, existing image path inside one of the allowed roots (if any are set)."""
    if not isinstance(path, str) or not path:
        raise ValueError("image path is empty")
    if not os.path.isabs(path):
        raise ValueError(f"image path {path!r} is not absolute")
    real = os.path.realpath(path)
    if roots and not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
        raise ValueError(f"image {path} is outside the allowed image roots ({', '.join(roots)})")
    if not os.path.exists(real):
        raise ValueError(f"image {path}: no such file")
    return real
