"""max_overlap: the sweep line behind the concurrency assertions of tests and benchmarks."""

from __future__ import annotations

import random

import pytest

from worker.timeline import max_overlap


def brute_force(spans: list[tuple[float, float]]) -> int:
    # Peaks of half-open intervals happen at some start; count who covers each start.
    return max(
        (sum(1 for s, e in spans if s <= t < e) for t, _ in spans if any(s < e for s, e in spans)),
        default=0,
    )


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        ([], 0),
        ([(0.0, 1.0)], 1),
        ([(0.0, 1.0), (2.0, 3.0)], 1),
        ([(0.0, 1.0), (1.0, 2.0)], 1),  # touching is not overlapping
        ([(1.0, 2.0), (0.0, 1.0), (2.0, 3.0)], 1),
        ([(0.0, 10.0), (1.0, 2.0), (3.0, 4.0)], 2),
        ([(0.0, 3.0), (1.0, 4.0), (2.0, 5.0)], 3),
        ([(0.0, 1.0)] * 5, 5),
        ([(1.0, 1.0)], 0),  # empty
        ([(0.0, 2.0), (1.0, 1.0), (1.0, 3.0)], 2),
        ([(0.0, 1.0), (1.0, 1.0), (1.0, 2.0)], 1),
    ],
)
def test_cases(spans: list[tuple[float, float]], expected: int) -> None:
    assert max_overlap(spans) == expected


def test_reversed_interval_is_an_error() -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        max_overlap([(0.0, 1.0), (2.0, 1.5)])


def test_agrees_with_brute_force() -> None:
    rng = random.Random(20240601)
    for _ in range(300):
        spans = []
        for _ in range(rng.randint(0, 12)):
            start = rng.randint(0, 20) / 2
            spans.append((start, start + rng.randint(0, 8) / 2))
        assert max_overlap(spans) == brute_force(spans), spans


def test_accepts_any_iterable() -> None:
    assert max_overlap(iter([(0.0, 2.0), (1.0, 3.0)])) == 2
