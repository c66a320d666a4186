"""Library settings: where attaches keep their state, which backend, how hard to retry,
which files an image may refer to and how large an image may be."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from vmcraft_tasks.craft.cache import CacheTTL
from vmcraft_tasks.craft.retry import RetryPolicy

BACKENDS = ("auto", "fuse", "kernel")

GIB = 1024**3
# 16 TiB: the largest disk the formats we read are used for in practice (VHDX's 64 TiB
# and qcow2's exabytes exist on paper); anything larger is an attack or an accident.
DEFAULT_MAX_VIRTUAL_SIZE_GIB = 16 * 1024
# A GPT holds 128 entries by default; more defined partitions is not a real disk.
DEFAULT_MAX_PARTITIONS = 128

ENV_WORK_DIR = "VMCRAFT_WORK_DIR"
ENV_IMAGE_ROOTS = "VMCRAFT_IMAGE_ROOTS"
ENV_MAX_VIRTUAL_SIZE_GIB = "VMCRAFT_MAX_VIRTUAL_SIZE_GIB"
ENV_MAX_PARTITIONS = "VMCRAFT_MAX_PARTITIONS"


def default_work_dir() -> str:
    """$VMCRAFT_WORK_DIR, else /run/vmcraft (tmpfs: cleared at boot), else the temp dir."""
    env = os.environ.get(ENV_WORK_DIR)
    if env:
        return env
    if os.access("/run", os.W_OK):
        return "/run/vmcraft"
    return os.path.join(tempfile.gettempdir(), "vmcraft")


def parse_roots(raw: str | None) -> tuple[str, ...]:
    """`/a:/b` as absolute paths (pure); empty parts are ignored."""
    if not raw:
        return ()
    return tuple(os.path.abspath(p) for p in raw.split(":") if p)


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from exc
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return value


def default_image_roots() -> tuple[str, ...]:
    return parse_roots(os.environ.get(ENV_IMAGE_ROOTS))


def default_max_virtual_size_gib() -> int:
    return _positive_int(os.environ, ENV_MAX_VIRTUAL_SIZE_GIB, DEFAULT_MAX_VIRTUAL_SIZE_GIB)


def default_max_partitions() -> int:
    return _positive_int(os.environ, ENV_MAX_PARTITIONS, DEFAULT_MAX_PARTITIONS)


@dataclass
class CraftSettings:
    """What one host's library may do.

    `image_roots`: the directories every file of an image (the image itself, its
    backing files, extents and data files) must lie in. Empty: each image may only
    refer to files inside its own directory.

    Unset fields come from the environment, like `work_dir`: a caller that forgets
    to pass the host's roots or limits still gets the ones its operator configured.
    """

    work_dir: str = field(default_factory=default_work_dir)
    backend: str = "auto"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache_ttl: CacheTTL = field(default_factory=CacheTTL)
    image_roots: tuple[str, ...] = field(default_factory=default_image_roots)
    max_virtual_size_gib: int = field(default_factory=default_max_virtual_size_gib)
    max_partitions: int = field(default_factory=default_max_partitions)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        self.image_roots = tuple(os.path.abspath(r) for r in self.image_roots)
        if self.max_virtual_size_gib < 1:
            raise ValueError(
                f"max_virtual_size_gib must be at least 1, not {self.max_virtual_size_gib}"
            )
        if self.max_partitions < 1:
            raise ValueError(f"max_partitions must be at least 1, not {self.max_partitions}")

    @property
    def max_virtual_size(self) -> int:
        """The limit in bytes."""
        return self.max_virtual_size_gib * GIB

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> CraftSettings:
        """Settings from VMCRAFT_WORK_DIR, VMCRAFT_IMAGE_ROOTS, VMCRAFT_MAX_VIRTUAL_SIZE_GIB
        and VMCRAFT_MAX_PARTITIONS; keyword arguments win over the environment."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "work_dir": env.get(ENV_WORK_DIR) or default_work_dir(),
            "image_roots": parse_roots(env.get(ENV_IMAGE_ROOTS)),
            "max_virtual_size_gib": _positive_int(
                env, ENV_MAX_VIRTUAL_SIZE_GIB, DEFAULT_MAX_VIRTUAL_SIZE_GIB
            ),
            "max_partitions": _positive_int(env, ENV_MAX_PARTITIONS, DEFAULT_MAX_PARTITIONS),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
