"""The leak check's view of loop devices: a loop left on a detached mount counts."""

from __future__ import annotations

from tests import leaks


def test_a_loop_whose_backing_mount_is_gone_is_counted_whatever_the_scope() -> None:
    assert leaks._orphaned("/dev/loop7 /")
    assert not leaks._orphaned("/dev/loop7 /tmp/run/attach-x/disk")
    assert not leaks._orphaned("/dev/loop7")
    before = leaks.HostSnapshot(frozenset(), frozenset(), frozenset())
    after = leaks.HostSnapshot(frozenset(), frozenset({"/dev/loop7 /"}), frozenset())
    assert after.new_since(before) == ["loop /dev/loop7 /"]
