"""Fleet settings, read from the environment once, the same in every client.

Workers, the scheduler, the CLI and Flower all build their Celery configuration
from `FleetSettings`, so time limits and the broker's visibility timeout can never
disagree between them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field

DEFAULT_REDIS = "redis://127.0.0.1:6379"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from exc
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return value


def _roots(raw: str | None) -> tuple[str, ...]:
    if not raw:
        return ()
    return tuple(os.path.abspath(p) for p in raw.split(":") if p)


def _output_roots(raw: str | None) -> tuple[str, ...]:
    """VMCRAFT_OUTPUT_ROOTS: absolute folders only. A relative root would depend on each
    worker's current directory, which is no policy at all."""
    roots = tuple(p for p in (raw or "").split(":") if p)
    relative = [p for p in roots if not os.path.isabs(p)]
    if relative:
        raise ValueError(f"VMCRAFT_OUTPUT_ROOTS must list absolute folders, not {relative[0]!r}")
    return tuple(os.path.normpath(p) for p in roots)


@dataclass(frozen=True, repr=False)
class FleetSettings:
    broker_url: str = f"{DEFAULT_REDIS}/0"
    result_backend: str = f"{DEFAULT_REDIS}/1"
    cache_url: str = f"{DEFAULT_REDIS}/2"
    host_id: str = field(default_factory=socket.gethostname)
    work_dir: str = "/run/vmcraft"
    image_roots: tuple[str, ...] = ()
    # Where outputs may be written; () means: under the folder of the batch's manifest,
    # as the client recorded it in the batch plan.
    output_roots: tuple[str, ...] = ()
    max_attached: int = 4  # NBD slots: disks attached at once on one host
    max_mounts: int = 4  # concurrent mount operations on one host (the guide's max_workers)
    max_conversions: int = 2  # concurrent qemu-img convert on one host
    max_boot_checks: int = 1  # concurrent boot checks on one host (each a busy qemu)
    boot_accel: str = "auto"  # auto: KVM when it really runs a guest here, else TCG
    boot_time_limit_s: int = 0  # 0: 600 s under TCG, 180 s with KVM
    mount_wait_s: int = 120  # how long a mount step waits for a place under max_mounts
    lease_ttl_s: int = 60  # slot leases expire unless the host heartbeat refreshes them
    heartbeat_s: int = 10
    soft_time_limit_s: int = 1800
    time_limit_s: int = 1900
    convert_time_limit_s: int = 6 * 3600  # the conversion step copies whole disks
    visibility_timeout_s: int = 7 * 3600

    def __post_init__(self) -> None:
        if not self.soft_time_limit_s < self.time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "time limits must satisfy soft < hard < broker visibility timeout "
                f"(got {self.soft_time_limit_s}, {self.time_limit_s}, {self.visibility_timeout_s})"
            )
        if not self.convert_time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "the conversion time limit must be below the broker visibility timeout "
                f"(got {self.convert_time_limit_s}, {self.visibility_timeout_s}): a longer "
                "conversion would be delivered twice"
            )
        if self.boot_accel not in ("auto", "tcg", "kvm"):
            raise ValueError(
                f"VMCRAFT_BOOT_ACCEL must be auto, tcg or kvm, not {self.boot_accel!r}"
            )
        if self.boot_time_limit_s and not self.boot_time_limit_s < self.soft_time_limit_s:
            raise ValueError("VMCRAFT_BOOT_TIME_LIMIT_S must be below VMCRAFT_SOFT_TIME_LIMIT_S")
        if self.heartbeat_s >= self.lease_ttl_s:
            raise ValueError("VMCRAFT_HEARTBEAT_S must be shorter than VMCRAFT_LEASE_TTL_S")

    def __repr__(self) -> str:
        # Celery's `inspect conf` (Flower's Config tab) shows this object: no passwords.
        from vmcraft_tasks.urls import mask_urls_in

        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return mask_urls_in(f"FleetSettings({fields})")

    @classmethod
    def from_env(cls) -> FleetSettings:
        env = os.environ
        broker = env.get("VMCRAFT_BROKER_URL", f"{DEFAULT_REDIS}/0")
        return cls(
            broker_url=broker,
            result_backend=env.get("VMCRAFT_RESULT_BACKEND", _sibling_db(broker, 1)),
            cache_url=env.get("VMCRAFT_CACHE_URL", _sibling_db(broker, 2)),
            host_id=env.get("VMCRAFT_HOST_ID") or socket.gethostname(),
            work_dir=env.get("VMCRAFT_WORK_DIR", "/run/vmcraft"),
            image_roots=_roots(env.get("VMCRAFT_IMAGE_ROOTS")),
            output_roots=_output_roots(env.get("VMCRAFT_OUTPUT_ROOTS")),
            max_attached=_int("VMCRAFT_MAX_ATTACHED", 4),
            max_mounts=_int("VMCRAFT_MAX_MOUNTS", 4),
            max_conversions=_int("VMCRAFT_MAX_CONVERSIONS", 2),
            max_boot_checks=_int("VMCRAFT_MAX_BOOT_CHECKS", 1),
            boot_accel=env.get("VMCRAFT_BOOT_ACCEL", "auto"),
            boot_time_limit_s=_int("VMCRAFT_BOOT_TIME_LIMIT_S", 0),
            mount_wait_s=_int("VMCRAFT_MOUNT_WAIT_S", 120),
            lease_ttl_s=_int("VMCRAFT_LEASE_TTL_S", 60),
            heartbeat_s=_int("VMCRAFT_HEARTBEAT_S", 10),
            soft_time_limit_s=_int("VMCRAFT_SOFT_TIME_LIMIT_S", 1800),
            time_limit_s=_int("VMCRAFT_TIME_LIMIT_S", 1900),
            convert_time_limit_s=_int("VMCRAFT_CONVERT_TIME_LIMIT_S", 6 * 3600),
            visibility_timeout_s=_int("VMCRAFT_VISIBILITY_TIMEOUT_S", 7 * 3600),
        )


def _sibling_db(url: str, db: int) -> str:
    """The same Redis server as `url`, another database number."""
    base, sep, last = url.rpartition("/")
    if sep and last.isdigit() and base.count("/") >= 2:
        return f"{base}/{db}"
    return f"{url.rstrip('/')}/{db}"
