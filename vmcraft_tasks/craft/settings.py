"""Library settings: where attaches keep their state, which backend, how hard to retry."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from vmcraft_tasks.craft.cache import CacheTTL
from vmcraft_tasks.craft.retry import RetryPolicy

BACKENDS = ("auto", "fuse", "kernel")


def default_work_dir() -> str:
    """$VMCRAFT_WORK_DIR, else /run/vmcraft (tmpfs: cleared at boot), else the temp dir."""
    env = os.environ.get("VMCRAFT_WORK_DIR")
    if env:
        return env
    if os.access("/run", os.W_OK):
        return "/run/vmcraft"
    return os.path.join(tempfile.gettempdir(), "vmcraft")


@dataclass
class CraftSettings:
    work_dir: str = field(default_factory=default_work_dir)
    backend: str = "auto"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache_ttl: CacheTTL = field(default_factory=CacheTTL)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
