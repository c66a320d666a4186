"""Shared benchmark plumbing: alternating runs, statistics, machine facts, tables, JSON.

Every benchmark runs its variants alternately (A B A B ...) so drift on the machine
hits all of them alike, and reports medians with min and max.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class Series:
    """Samples of one variant, in seconds (or any unit the benchmark names)."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "n": len(self.samples),
            "samples": self.samples,
        }


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, Series]:
    """Run each variant once per round, in turn; each call returns its own measurement."""
    series = {name: Series(name) for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            series[name].samples.append(run())
    return series


def timed(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def machine_facts() -> dict[str, Any]:
    from vmcraft_tasks.craft.nbd.select import kernel_nbd_usable

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "backend": "kernel" if kernel_nbd_usable() else "fuse",
    }


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ms(seconds: float) -> float:
    return seconds * 1000.0


def save(name: str, data: dict[str, Any]) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"machine": machine_facts(), **data}, fh, indent=2, default=str)
    return path
