"""Queue names and routing, declared once.

Every VM starts on the shared intake queue; the host that attaches its disk pins
every later step to `vmcraft.host.<id>` through `pin()`, the one helper that
routes a canvas, so no chord body or errback lands on another host.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Queue

INTAKE_QUEUE = "vmcraft.intake"
HOST_QUEUE_PREFIX = "vmcraft.host."


def host_queue(host_id: str) -> str:
    if not host_id or any(c in host_id for c in " /\\"):
        raise ValueError(f"invalid host id {host_id!r}")
    return HOST_QUEUE_PREFIX + host_id


def declared_queues() -> list[Queue]:
    # Host queues are created on demand (task_create_missing_queues).
    return [Queue(INTAKE_QUEUE, routing_key=INTAKE_QUEUE)]  # type: ignore[no-untyped-call]


def pin(sig: Any, host_id: str) -> Any:
    """Route a signature or canvas (chain, group, chord) and its callbacks to one host."""
    queue = host_queue(host_id)
    _pin(sig, queue)
    return sig


def _pin(sig: Any, queue: str) -> None:
    from celery.canvas import _chain, chord, group

    if isinstance(sig, _chain):
        for task in sig.tasks:
            _pin(task, queue)
    elif isinstance(sig, chord):
        for task in sig.tasks:
            _pin(task, queue)
        if sig.body is not None:
            _pin(sig.body, queue)
    elif isinstance(sig, group):
        for task in sig.tasks:
            _pin(task, queue)
    sig.set(queue=queue)
    for key in ("link", "link_error"):
        callbacks = sig.options.get(key)
        if callbacks:
            # Canvas operations may have turned callbacks into plain dicts.
            sig.options[key] = [_pinned_copy(c, queue) for c in callbacks]


def _pinned_copy(callback: Any, queue: str) -> Any:
    from celery.canvas import maybe_signature

    sig = maybe_signature(callback)
    _pin(sig, queue)
    return sig
