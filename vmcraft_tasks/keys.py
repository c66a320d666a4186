"""Every Redis key the fleet uses, in one place.

All keys live under one versioned prefix, `PREFIX` (`vmcraft:v2:`), so a change of
key shape or value format moves to a new version while hosts of both versions share
one Redis. (v2: batch and job keys carry hash tags, and the scan cache moved under
the prefix.) kombu's and Celery's own keys (queues, `unacked`, results) are theirs
and are not spelled here.

Hash tags: every Lua script and every MULTI touches the keys of one slot only, so the
scripts stay valid on a Redis Cluster (`tests/unit/test_keys.py` checks each one):

- host keys are tagged by the host: `vmcraft:v2:host:{web01}:slot:3`
- batch keys by the batch name: `vmcraft:v2:batch:{wave-1}:pending`
- job keys by the job id: `vmcraft:v2:job:{wave-1.web01}`, `...:steps`
- scan cache keys by their namespace (see `cache_prefix`).

Expiry: every key a batch or a VM creates expires (batch keys `BATCH_TTL_S` after
they were last written, job keys `JOB_TTL_S`, host keys with their lease or
heartbeat). The keys that may live without a TTL are fleet-wide and few:
`PERSISTENT` lists them.

Keys name hosts, slot numbers and limit names, never a device path: `/dev/nbd3` on
one host says nothing about another, and a key must mean the same thing fleet-wide.
"""

from __future__ import annotations

import re

PREFIX = "vmcraft:v2:"

BATCH_TTL_S = 30 * 24 * 3600
JOB_TTL_S = 14 * 24 * 3600

# No ':' (it would let two different (host, name) pairs spell the same key), no '/'
# (keeps device paths out), no braces (they would break the hash tag).
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
# Batch names and job ids: what the manifest and the message policy accept (a batch
# id may start with '.' or '-'; a job id is `<batch>.<vm id>` or a client's id), with
# the same characters ruled out.
_ID = re.compile(r"[A-Za-z0-9._@-]{1,200}")
# Scan cache namespaces are chosen by operators and benchmarks (`a:b:c`): no braces
# except one well-formed hash tag, no whitespace.
_NAMESPACE = re.compile(r"[^{}\s]+(?:\{[^{}\s]+\}[^{}\s]*)?|\{[^{}\s]+\}[^{}\s]*")

_PART_RULE = (
    "use letters, digits, '.', '_', '@', '-' (at most 128, a letter or digit first, no ':' or '/')"
)
_ID_RULE = "use letters, digits, '.', '_', '@', '-' (at most 200, no ':' or '/')"
_NAMESPACE_RULE = "no whitespace, and braces only as one hash tag ('{name}')"


class KeyPartError(ValueError):
    """A host id, limit name, event kind, batch name or job id cannot be part of a key."""

    def __init__(self, what: str, value: object, rule: str = _PART_RULE) -> None:
        self.what = what
        self.value = value
        super().__init__(f"{what} {value!r} cannot be part of a Redis key: {rule}")


def _part(what: str, value: str) -> str:
    if not isinstance(value, str) or not _PART.fullmatch(value):
        raise KeyPartError(what, value)
    return value


def _id(what: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise KeyPartError(what, value, _ID_RULE)
    return value


# -- hosts (tag: the host id) -----------------------------------------------------


def _host_prefix(host: str) -> str:
    return f"{PREFIX}host:{{{_part('host id', host)}}}:"


def slot_key(host: str, slot: int) -> str:
    """The lease on NBD slot `slot` of `host`; its value is the owner id (PX)."""
    if slot < 0:
        raise ValueError(f"slot must be >= 0, not {slot}")
    return f"{_host_prefix(host)}slot:{slot}"


def semaphore_key(host: str, name: str) -> str:
    """A host-wide counting semaphore (`mounts`, `conversions`, ...): a ZSET of holders
    (PEXPIRE: lapses when its holders all vanished)."""
    return f"{_host_prefix(host)}sem:{_part('limit name', name)}"


def semaphore_holders_key(semaphore: str) -> str:
    """Who holds each place of the semaphore `semaphore` (a `semaphore_key`): a hash
    with the semaphore's hash tag, so both stay in one slot."""
    return f"{semaphore}:holders"


def host_key(host: str) -> str:
    """The heartbeat of `host`: its `HostInfo` as JSON; exists only while it beats."""
    return f"{_host_prefix(host)}heartbeat"


def events_key(host: str, kind: str) -> str:
    """Recorded intervals of one kind on one host (tests and benchmarks; a day's TTL)."""
    return f"{_host_prefix(host)}events:{_part('event kind', kind)}"


def host_tasks_key(host: str) -> str:
    """The task ids `host`'s worker holds right now (reserved, scheduled, running), as
    JSON with the Redis time it was taken; lapses with the heartbeat."""
    return f"{_host_prefix(host)}tasks"


# -- fleet-wide -------------------------------------------------------------------


def hosts_index() -> str:
    """Every host that ever beat, scored by its last heartbeat (Redis server time).
    No TTL: one member per host, removed by `forget_host`."""
    return f"{PREFIX}hosts"


def batches_index() -> str:
    """Every batch, scored by when it was created. No TTL: entries older than
    `BATCH_TTL_S` (their batch keys are gone by then) are trimmed whenever a batch is
    created (`BatchStore.create`)."""
    return f"{PREFIX}batches"


def lock_key(name: str) -> str:
    """A fleet-wide lock (SET NX PX): one host at a time runs a fleet-wide chore."""
    return f"{PREFIX}lock:{_part('lock name', name)}"


# -- batches (tag: the batch name) ------------------------------------------------


def _batch_prefix(batch: str) -> str:
    return f"{PREFIX}batch:{{{_id('batch name', batch)}}}:"


def batch_meta_key(batch: str) -> str:
    """The batch's plan (JSON), `max_parallel`, `created` and other fields: a hash."""
    return f"{_batch_prefix(batch)}meta"


def batch_pending_key(batch: str) -> str:
    """VMs waiting to start, scored by priority: a ZSET."""
    return f"{_batch_prefix(batch)}pending"


def batch_inflight_key(batch: str) -> str:
    """How many of the batch's VMs run now: a counter."""
    return f"{_batch_prefix(batch)}inflight"


def batch_ended_key(batch: str) -> str:
    """VMs that ended (counted once each): a set."""
    return f"{_batch_prefix(batch)}ended"


def batch_vms_key(batch: str) -> str:
    """Every VM of the batch, in manifest order: a list."""
    return f"{_batch_prefix(batch)}vms"


def batch_attempts_key(batch: str) -> str:
    """VM id -> how many start messages it was sent (task ids stay unique): a hash."""
    return f"{_batch_prefix(batch)}attempts"


def batch_host_key(batch: str, host: str) -> str:
    """The batch's VMs in flight on `host` (`limits.max_per_host`): a set."""
    return f"{_batch_prefix(batch)}host:{_part('host id', host)}"


def batch_hosts_key(batch: str) -> str:
    """The hosts the batch has a `batch_host_key` set on: a set (to drop them)."""
    return f"{_batch_prefix(batch)}hosts"


def batch_keys(batch: str) -> list[str]:
    """The batch's own keys (not the per-host sets): they expire together."""
    return [
        batch_meta_key(batch),
        batch_pending_key(batch),
        batch_inflight_key(batch),
        batch_ended_key(batch),
        batch_vms_key(batch),
        batch_attempts_key(batch),
        batch_hosts_key(batch),
    ]


# -- jobs (tag: the job id) -------------------------------------------------------


def job_key(job_id: str) -> str:
    """A VM's job record: a hash (status, host, timestamps, progress, result)."""
    return f"{PREFIX}job:{{{_id('job id', job_id)}}}"


def job_steps_key(job_id: str) -> str:
    """Which host ran which step of the job, and how it ended: a list of JSON."""
    return f"{job_key(job_id)}:steps"


# -- scan cache (tag: the namespace) ----------------------------------------------

CACHE_NAMESPACE = f"{PREFIX}{{cache}}"


def cache_prefix(namespace: str) -> str:
    """What every key of the scan cache `namespace` starts with.

    The GET script touches an entry and the stats hash, so all keys of a namespace
    share one hash tag: the namespace's own tag if it has one (the default,
    `vmcraft:v2:{cache}`), else `{c}` after it (`bench:run1` -> `bench:run1:{c}`).
    """
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise KeyPartError("cache namespace", namespace, _NAMESPACE_RULE)
    return namespace if "{" in namespace else f"{namespace}:{{c}}"


def cache_entry_key(namespace: str, key: str) -> str:
    """One cached scan result (JSON, PX)."""
    return f"{cache_prefix(namespace)}:{key}"


def cache_generation_key(namespace: str, disk_identity: str) -> str:
    """The cache generation of one disk (PX, refreshed on read)."""
    return f"{cache_prefix(namespace)}:gen:{disk_identity}"


def cache_stats_key(namespace: str) -> str:
    """Hit and miss counters of the namespace: a hash, no TTL (one per namespace)."""
    return f"{cache_prefix(namespace)}:stats"


# Keys that may exist without a TTL: fleet-wide, bounded, cleaned up otherwise.
PERSISTENT: tuple[str, ...] = (
    hosts_index(),
    batches_index(),
    cache_stats_key(CACHE_NAMESPACE),
)
