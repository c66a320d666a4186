"""Retry policy for attaching disks: exponential backoff with jitter, transient errors only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from vmcraft_tasks.craft.errors import TransientAttachError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try.

    Three attempts as in the performance guide. The base and cap are far below the
    guide's seconds because the failures we retry (a socket not there yet, a device
    taken by a racing host process) clear in milliseconds on a local host.
    """

    attempts: int = 3
    base_s: float = 0.1
    cap_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("backoff times must not be negative")


def call_with_retry(
    func: Callable[[int], T],
    policy: RetryPolicy,
    *,
    cleanup: Callable[[], None] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> tuple[T, int]:
    """Call `func(attempt_number)` until it succeeds; return (result, attempts used).

    Only `TransientAttachError` is retried; `cleanup` runs after each failed attempt
    so the next one starts from nothing. The last transient error is re-raised with
    the attempt count set.
    """

    def after_failure(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("attach attempt %d failed: %s", state.attempt_number, exc)

    kwargs = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_random_exponential(multiplier=policy.base_s, max=policy.cap_s),
        retry=retry_if_exception_type(TransientAttachError),
        after=after_failure,
        reraise=True,
        **kwargs,  # type: ignore[arg-type]
    )
    attempt_no = 0
    try:
        for attempt in retrying:
            with attempt:
                attempt_no = attempt.retry_state.attempt_number
                try:
                    return func(attempt_no), attempt_no
                except TransientAttachError:
                    if cleanup is not None:
                        cleanup()
                    raise
    except TransientAttachError as exc:
        exc.attempts = attempt_no
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")
