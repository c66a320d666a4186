"""What the broker holds for the fleet's VMs: queued messages and unacknowledged ones.

kombu's Redis transport keeps a queue as a list (LPUSH to publish, BRPOP to take)
and emulates acknowledgements: a message a worker took sits in the `unacked` hash
(delivery tag -> [message, exchange, routing key]) with its delivery time in the
`unacked_index` sorted set until the worker acks it. If that worker dies, or loses
its connection before it can ack, kombu puts the message back only once it is older
than the visibility timeout, which must be longer than the longest step (hours).

This module reads both, finds which VM (job id) each message is for, and restores or
drops one unacknowledged message atomically, so the reconciler can redeliver the
step of a dead holder within a heartbeat or two instead of hours.

Only messages of VM steps (task names `vmcraft.*`) routed to the fleet's own queues
are ever touched.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import NEVER_DECODE

from vmcraft_tasks import luascripts
from vmcraft_tasks.queues import HOST_QUEUE_PREFIX, INTAKE_QUEUE

log = logging.getLogger(__name__)

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
TASK_PREFIX = "vmcraft."
# A queue longer than this is not read whole on every tick; its VMs count as queued.
SCAN_LIMIT = 5000

# kombu's keys and values are kombu's: it writes its messages as JSON text, but
# anyone who can reach the broker can push a value that is not UTF-8. The fleet's
# clients decode every reply (`decode_responses=True`), and one such value would then
# fail the whole reply, and with it every reconcile tick, with a UnicodeDecodeError.
# So kombu's structures are read as bytes, per command (redis-py's NEVER_DECODE
# option, the one its DUMP command uses), and each value is decoded on its own: a value
# that is not text is skipped like any other message that is not ours.
_RAW: dict[str, Any] = {NEVER_DECODE: []}


@dataclass(frozen=True)
class Message:
    """One task message of a VM step, queued or unacknowledged."""

    task_id: str
    retries: int
    task: str
    job_id: str | None
    queue: str
    # Unacknowledged messages only:
    tag: str | None = None
    delivered_at: float | None = None
    entry: str | None = None  # the `unacked` value exactly as read (for compare-and-move)

    @property
    def host(self) -> str | None:
        """The host whose queue this message is routed to (None: the intake queue)."""
        return self.queue[len(HOST_QUEUE_PREFIX) :] if is_host_queue(self.queue) else None


def is_host_queue(queue: str) -> bool:
    return queue.startswith(HOST_QUEUE_PREFIX)


def is_fleet_queue(queue: str) -> bool:
    return queue == INTAKE_QUEUE or is_host_queue(queue)


def job_id_of(args: Any) -> str | None:
    """The VM a step's arguments are for: the last dict with a `job_id` (pure; the
    same rule as `VMStep`)."""
    found = None
    if isinstance(args, list | tuple):
        for arg in args:
            if isinstance(arg, dict) and isinstance(arg.get("job_id"), str):
                found = arg["job_id"]
    return found


def parse_payload(payload: Any, queue: str) -> Message | None:
    """A kombu message (the dict kombu stores) as a `Message`, or None if it is not a
    VM step (pure)."""
    if not isinstance(payload, dict):
        return None
    headers = payload.get("headers") or {}
    task = headers.get("task")
    task_id = headers.get("id")
    if not isinstance(task, str) or not task.startswith(TASK_PREFIX) or not task_id:
        return None
    return Message(
        task_id=str(task_id),
        retries=int(headers.get("retries") or 0),
        task=task,
        job_id=job_id_of(_decode_args(payload)),
        queue=queue,
    )


def _decode_args(payload: dict[str, Any]) -> Any:
    body = payload.get("body")
    if not isinstance(body, str):
        return None
    props = payload.get("properties") or {}
    try:
        text = base64.b64decode(body) if props.get("body_encoding") == "base64" else body
        decoded = json.loads(text)
    except (ValueError, binascii.Error, TypeError):
        return None
    # Celery protocol 2: [args, kwargs, embed].
    return decoded[0] if isinstance(decoded, list) and decoded else None


def redelivered_copy(payload: dict[str, Any]) -> dict[str, Any]:
    """The message as kombu itself restores it: marked redelivered (pure)."""
    copy: dict[str, Any] = json.loads(json.dumps(payload))
    copy.setdefault("headers", {})["redelivered"] = True
    props = copy.setdefault("properties", {})
    props.setdefault("delivery_info", {})["redelivered"] = True
    return copy


def _kombu_text(value: bytes | str) -> str | None:
    """A value read as bytes, as text; None if it is not UTF-8 (not kombu's)."""
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def _score_pairs(reply: Any) -> list[tuple[Any, Any]]:
    """ZRANGE WITHSCORES as (member, score) pairs, whether redis-py paired them or not."""
    items = list(reply or [])
    if items and not isinstance(items[0], list | tuple):
        return list(zip(items[0::2], items[1::2], strict=True))
    return [(pair[0], pair[1]) for pair in items]


class Broker:
    """The fleet's view of kombu's structures in the broker database."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._move = luascripts.register(client, "broker_move")

    def queued(self, queues: Iterable[str]) -> tuple[list[Message], bool]:
        """Messages waiting in `queues`, and whether every queue was read whole."""
        found: list[Message] = []
        complete = True
        names = [q for q in dict.fromkeys(queues) if is_fleet_queue(q)]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.execute_command("LRANGE", name, 0, SCAN_LIMIT - 1, **_RAW)  # type: ignore[no-untyped-call]
            pipe.llen(name)
        replies = pipe.execute()
        for i, name in enumerate(names):
            items, length = replies[2 * i], int(replies[2 * i + 1])
            complete = complete and length <= SCAN_LIMIT
            for item in items:
                try:
                    # bytes that are not UTF-8 raise UnicodeDecodeError, a ValueError
                    message = parse_payload(json.loads(item), name)
                except ValueError:
                    continue
                if message is not None:
                    found.append(message)
        return found, complete

    def unacked(self) -> list[Message]:
        """Every VM step message taken by some worker and not acknowledged yet."""
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command("HGETALL", UNACKED, **_RAW)  # type: ignore[no-untyped-call]
        pipe.execute_command("ZRANGE", UNACKED_INDEX, 0, -1, "WITHSCORES", **_RAW)  # type: ignore[no-untyped-call]
        entries, index = pipe.execute()
        delivered = {_kombu_text(tag): float(score) for tag, score in _score_pairs(index)}
        found = []
        for raw_tag, raw_entry in entries.items():
            tag, entry = _kombu_text(raw_tag), _kombu_text(raw_entry)
            if tag is None or entry is None:
                continue
            try:
                payload, _exchange, routing_key = json.loads(entry)
            except (ValueError, TypeError):
                continue
            if not isinstance(routing_key, str) or not is_fleet_queue(routing_key):
                continue
            message = parse_payload(payload, routing_key)
            if message is None:
                continue
            found.append(
                Message(
                    task_id=message.task_id,
                    retries=message.retries,
                    task=message.task,
                    job_id=message.job_id,
                    queue=routing_key,
                    tag=tag,
                    delivered_at=delivered.get(tag),
                    entry=entry,
                )
            )
        return found

    def restore(self, message: Message) -> bool:
        """Put an unacknowledged message back at the head of its queue, marked
        redelivered; False if it was acked or restored meanwhile."""
        if message.tag is None or message.entry is None:
            raise ValueError("only an unacknowledged message can be restored")
        payload, _exchange, _key = json.loads(message.entry)
        pushed = json.dumps(redelivered_copy(payload))
        return self._moved(message, pushed)

    def drop(self, message: Message) -> bool:
        """Remove an unacknowledged message whose step must not run again (its VM
        ended, or the step already ran to its end); False if it was gone already."""
        return self._moved(message, "")

    def _moved(self, message: Message, pushed: str) -> bool:
        assert message.tag is not None and message.entry is not None
        keys = [UNACKED, UNACKED_INDEX, message.queue]
        return bool(self._move(keys=keys, args=[message.tag, message.entry, pushed]))
