"""Mount many filesystems at once without hiding a child under its parent."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from vmcraft_tasks.craft.mount.ladder import MountResult


def _norm(path: str) -> str:
    return os.path.normpath(path)


def _is_under(child: str, parent: str) -> bool:
    return child != parent and (child.startswith(parent.rstrip("/") + "/") or parent == "/")


def nearest_parent(mountpoint: str, others: Sequence[str]) -> str | None:
    """The deepest other mountpoint that contains `mountpoint` (pure)."""
    candidates = [o for o in others if _is_under(mountpoint, o)]
    return max(candidates, key=len) if candidates else None


def mount_waves(mountpoints: Sequence[str]) -> list[list[str]]:
    """Group mountpoints into waves: every parent in an earlier wave than its children (pure).

    Within a wave nothing nests, so a wave can be mounted in parallel.
    """
    norm = [_norm(m) for m in mountpoints]
    if len(set(norm)) != len(norm):
        dupes = sorted({m for m in norm if norm.count(m) > 1})
        raise ValueError(f"mountpoint requested twice: {', '.join(dupes)}")
    depth: dict[str, int] = {}

    def level(m: str) -> int:
        if m not in depth:
            parent = nearest_parent(m, norm)
            depth[m] = 0 if parent is None else level(parent) + 1
        return depth[m]

    waves: dict[int, list[str]] = {}
    for m in norm:
        waves.setdefault(level(m), []).append(m)
    return [waves[k] for k in sorted(waves)]


MountOne = Callable[[str, str], MountResult]


def mount_all_parallel(
    devices: Sequence[tuple[str, str]],
    mount_one: MountOne,
    *,
    max_workers: int = 4,
) -> dict[str, MountResult]:
    """Mount `(device, mountpoint)` pairs, each wave in parallel; returns {mountpoint: result}.

    A failed parent skips its children (they would land in the host directory
    the parent was meant to cover); every other partition still mounts.
    """
    if max_workers < 1:
        raise ValueError("max_workers must be at least 1")
    by_mountpoint = {_norm(mp): dev for dev, mp in devices}
    waves = mount_waves([mp for _, mp in devices])
    results: dict[str, MountResult] = {}
    all_mps = list(by_mountpoint)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mount") as pool:
        for wave in waves:
            runnable = []
            for mp in wave:
                parent = nearest_parent(mp, all_mps)
                if parent is not None and not results[parent].ok:
                    results[mp] = MountResult(
                        device=by_mountpoint[mp],
                        mountpoint=mp,
                        ok=False,
                        error=f"parent mount {parent} failed",
                    )
                else:
                    runnable.append(mp)
            futures = {mp: pool.submit(mount_one, by_mountpoint[mp], mp) for mp in runnable}
            for mp, future in futures.items():
                results[mp] = future.result()
    return {_norm(mp): results[_norm(mp)] for _, mp in devices}
