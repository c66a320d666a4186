"""NBD slot leases: which task holds which of a host's `max_attached` slots.

A slot is a Redis key (`keys.slot_key`) set with NX and a PX expiry, holding the
owner id (a task id). Redis is the guarantee that two processes never hold one
slot: the Lua scripts (`lua/lease_*.lua`) run atomically, so "find the lowest free slot and take
it" cannot interleave with another acquire, on this host or any other.

Leases expire unless refreshed (the host heartbeat calls `refresh_all`), so a host
that dies gives its slots back after `ttl_s` without anyone cleaning up.

With a `work_dir`, every lease this host takes is also mirrored by a small file in
`<work_dir>/leases/`: Redis may forget a lease (a restart without persistence, or a
lease that lapsed while Redis was down) while the VM it stands for is still attached
here. The reconciler reads the mirror to know what this host holds whatever Redis
says, re-takes lapsed leases of VMs still alive here, and releases the disks of VMs
whose records are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from vmcraft_tasks import keys, luascripts
from vmcraft_tasks.craft.atomicfile import atomic_write, locked

HOST_SLOTS_LOCK = "host-slots.lock"
LEASES_DIR = "leases"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


@dataclass(frozen=True)
class Lease:
    host: str
    slot: int
    owner: str

    @property
    def key(self) -> str:
        return keys.slot_key(self.host, self.slot)


def _ttl_ms(ttl_s: float) -> int:
    """`ttl_s` as whole milliseconds for PX/PEXPIRE; sub-second TTLs are fine."""
    ms = round(ttl_s * 1000)
    if ms < 1:
        raise ValueError(f"ttl must be at least 1 ms, not {ttl_s} s")
    return ms


@contextmanager
def _host_lock(work_dir: str | None) -> Iterator[None]:
    """Serialise acquires among this host's processes.

    Not needed for correctness (the Lua script is atomic); it exists for operators
    who want acquires on one host to be strictly one at a time. Each call opens its
    own file description, so the flock excludes threads of one process as well.
    """
    if work_dir is None:
        yield
        return
    os.makedirs(work_dir, exist_ok=True)
    with locked(os.path.join(work_dir, HOST_SLOTS_LOCK)):
        yield


class SlotLeases:
    """The `slots` NBD slots of one host, leased for `ttl_s` at a time."""

    def __init__(
        self,
        client: redis.Redis,
        host: str,
        slots: int,
        ttl_s: float,
        *,
        work_dir: str | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a host needs at least 1 slot, not {slots}")
        self.host = host
        self.slots = slots
        self.ttl_s = ttl_s
        self.work_dir = work_dir
        self._client = client
        self._ttl_ms = _ttl_ms(ttl_s)
        self._keys = [keys.slot_key(host, slot) for slot in range(slots)]
        # lua/lease_*.lua; KEYS: this host's slot keys (one host tag, one slot).
        self._acquire = luascripts.register(client, "lease_acquire")
        self._release = luascripts.register(client, "lease_release")
        self._refresh = luascripts.register(client, "lease_refresh")

    def acquire(self, owner: str) -> Lease | None:
        """The lowest free slot, or the one `owner` already holds; None when full."""
        _check_owner(owner)
        with _host_lock(self.work_dir):
            slot = int(self._acquire(keys=self._keys, args=[owner, self._ttl_ms]))
        if slot < 0:
            return None
        self._mirror(owner, slot)
        return Lease(self.host, slot, owner)

    def release(self, lease_or_owner: Lease | str) -> bool:
        """Free the lease if it is still held by its owner; False if it was not."""
        if isinstance(lease_or_owner, Lease):
            if lease_or_owner.host != self.host or lease_or_owner.slot >= self.slots:
                raise ValueError(f"{lease_or_owner} is not a lease of host {self.host}")
            owner, slot_keys = lease_or_owner.owner, [lease_or_owner.key]
        else:
            owner, slot_keys = lease_or_owner, self._keys
        _check_owner(owner)
        released = int(self._release(keys=slot_keys, args=[owner])) > 0
        # The owner gives the slot up either way: a lease that lapsed is not ours either.
        self.forget_local(owner)
        return released

    def refresh_all(self, owners: AbstractSet[str] | None = None) -> int:
        """Extend to `ttl_s` the leases of `owners` (None: every lease on the host).

        Returns how many leases were extended.
        """
        if owners is not None and not owners:
            return 0
        every = "1" if owners is None else "0"
        args: list[str | int] = [self._ttl_ms, every, *sorted(owners or ())]
        return int(self._refresh(keys=self._keys, args=args))

    def held(self) -> dict[int, str]:
        """Slot number -> owner, for every slot currently leased."""
        values: list[str | None] = self._client.mget(self._keys)  # type: ignore[assignment]
        return {slot: v for slot, v in enumerate(values) if v is not None}

    def free_count(self) -> int:
        return self.slots - len(self.held())

    def local_owners(self) -> list[str]:
        """Owners this host took a lease for and did not release (from the mirror)."""
        if self.work_dir is None:
            return []
        found = []
        directory = os.path.join(self.work_dir, LEASES_DIR)
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(directory, name)) as fh:
                    found.append(str(json.load(fh)["owner"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def forget_local(self, owner: str) -> None:
        """Drop the mirror of `owner`'s lease (the VM ended or left this host)."""
        if self.work_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._mirror_path(owner))

    def _mirror_path(self, owner: str) -> str:
        assert self.work_dir is not None
        return os.path.join(self.work_dir, LEASES_DIR, _UNSAFE.sub("_", owner)[:200] + ".json")

    def _mirror(self, owner: str, slot: int) -> None:
        if self.work_dir is None:
            return
        path = self._mirror_path(owner)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        record = {"owner": owner, "host": self.host, "slot": slot, "at": time.time()}
        atomic_write(path, json.dumps(record), fsync=False)

    def owner_of(self, owner: str) -> Lease | None:
        """The lease `owner` holds on this host, if any."""
        for slot, holder in self.held().items():
            if holder == owner:
                return Lease(self.host, slot, owner)
        return None


def _check_owner(owner: str) -> None:
    if not owner:
        raise ValueError("a lease owner id must not be empty")
