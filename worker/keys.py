"""Every Redis key the fleet uses, in one place.

Keys live under a versioned namespace so a change of value format can move to
`vmcraft:v2:` while hosts of both versions share one Redis. Per-host keys put the
host id in a hash tag (`{web01}`): all keys a Lua script touches for one host then
hash to the same Redis Cluster slot, so the scripts stay valid on a cluster.

Keys name hosts, slot numbers and limit names, never a device path: `/dev/nbd3` on
one host says nothing about another, and a key must mean the same thing fleet-wide.
"""

from __future__ import annotations

import re

NAMESPACE = "vmcraft:v1:"

# No ':' (it would let two different (host, name) pairs spell the same key), no '/'
# (keeps device paths out), no braces (they would break the hash tag).
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


class KeyPartError(ValueError):
    """A host id, limit name or event kind cannot be part of a key."""

    def __init__(self, what: str, value: str) -> None:
        self.what = what
        self.value = value
        super().__init__(
            f"{what} {value!r} cannot be part of a Redis key: "
            "use letters, digits, '.', '_', '@', '-' (at most 128, no ':' or '/')"
        )


def _part(what: str, value: str) -> str:
    if not _PART.fullmatch(value):
        raise KeyPartError(what, value)
    return value


def _host_prefix(host: str) -> str:
    return f"{NAMESPACE}host:{{{_part('host id', host)}}}:"


def slot_key(host: str, slot: int) -> str:
    """The lease on NBD slot `slot` of `host`; its value is the owner id."""
    if slot < 0:
        raise ValueError(f"slot must be >= 0, not {slot}")
    return f"{_host_prefix(host)}slot:{slot}"


def semaphore_key(host: str, name: str) -> str:
    """A host-wide counting semaphore (`mounts`, `conversions`, ...): a ZSET of holders."""
    return f"{_host_prefix(host)}sem:{_part('limit name', name)}"


def host_key(host: str) -> str:
    """The heartbeat of `host`: its `HostInfo` as JSON; exists only while it beats."""
    return f"{_host_prefix(host)}heartbeat"


def events_key(host: str, kind: str) -> str:
    """Recorded intervals of one kind on one host (tests and benchmarks)."""
    return f"{_host_prefix(host)}events:{_part('event kind', kind)}"


def hosts_index() -> str:
    """Every host that ever beat, scored by its last heartbeat (Redis server time)."""
    return f"{NAMESPACE}hosts"


def host_tasks_key(host: str) -> str:
    """The task ids `host`'s worker holds right now (reserved, scheduled, running), as
    JSON with the Redis time it was taken; lapses with the heartbeat."""
    return f"{_host_prefix(host)}tasks"


def lock_key(name: str) -> str:
    """A fleet-wide lock (SET NX PX): one host at a time runs a fleet-wide chore."""
    return f"{NAMESPACE}lock:{_part('lock name', name)}"
