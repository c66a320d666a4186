"""kombu's Redis transport, with its restore of unacknowledged messages made safe.

When a channel closes (a connection loss, a shutdown, the garbage collector), kombu
puts the messages this process took but did not acknowledge back on their queues:
`QoS.restore_unacked`. If the connection object behind the channel was already torn
down (a broker restart can do this: the consumer's connection is closed while a
channel of it is still being collected), kombu asks it for the broker's address and
dies with `AttributeError: 'NoneType' object has no attribute 'hostname'`; it happened
in about one in six Redis restarts, and took the worker's consumer with it. A broker
that is down makes the same restore raise a connection error.

Nothing is lost by not restoring there: the messages stay in the broker's `unacked`
hash, and the host's reconciler (`worker.reconcile`) redelivers every message no live
worker holds within a heartbeat or two. So this QoS restores what it can, tag by
tag, and leaves the rest to the reconciler instead of raising.

The same torn-down channel breaks publishing: a step that hands its VM on while
Redis restarts retries the publish (kombu's `ensure`), and the retry may reach a
channel whose connection is gone, which fails with `AttributeError: 'NoneType' object
has no attribute 'client'`: not a connection error, so kombu does not reconnect and the
step fails. The channel here says what that is, a lost connection, so kombu
reconnects, revives the producer on a new channel and publishes.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        delivered = list(self._delivered)
        left = 0
        errors = (AttributeError, *self.channel.connection_errors)
        for tag in delivered:
            try:
                self.restore_by_tag(tag, client=client)  # type: ignore[no-untyped-call]
            except errors as exc:
                left += 1
                log.debug("could not restore message %s: %r", tag, exc)
        self._delivered.clear()
        if left:
            log.warning(
                "%d unacknowledged messages not restored at channel close (the broker "
                "connection is gone); the host's reconciler redelivers them",
                left,
            )


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> Any:
        connection = self.connection
        if connection is None or getattr(connection, "client", None) is None:
            raise redis.exceptions.ConnectionError(
                "the broker channel was closed with its connection (reconnecting)"
            )
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
