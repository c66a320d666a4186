"""One attach, several steps: later steps take the disk over from its state directory."""

from __future__ import annotations

import os

from vmcraft_tasks.craft.inspect_disk import find_roots, private_mountpoint, scan
from vmcraft_tasks.craft.vmcraft import VMCraft


def test_steps_hand_the_attach_over_and_the_last_one_detaches(linux_gpt_raw):
    first = VMCraft(linux_gpt_raw.path).launch()
    state_dir = first.disk.state_dir
    parts, filesystems = scan(first)
    devices = {p.number: p.device for p in parts}
    first.forget()
    assert os.path.isdir(state_dir)

    # Each mount step resumes on its own handle, as a separate worker process would.
    results = {}
    for number in (2, 3, 4):
        step = VMCraft.resume(state_dir)
        assert step.device(number) == devices[number]  # no second loop device
        results[number] = step.mount_with_fallback(number, private_mountpoint(step, number))
        step.forget()
    assert all(results.values())

    inspector = VMCraft.resume(state_dir)
    assert {m.mountpoint for m in inspector.mounts()} == {r.mountpoint for r in results.values()}
    (root,) = find_roots(inspector, parts, filesystems, results)
    assert root.hostname == linux_gpt_raw.notes["hostname"]
    inspector.forget()

    last = VMCraft.resume(state_dir)
    last.shutdown()
    assert not os.path.exists(state_dir)
