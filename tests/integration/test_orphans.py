"""A process that dies with a disk attached: the disk survives it and is released later by id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from vmcraft_tasks.craft.mountinfo import mounts_under as mounted_under
from vmcraft_tasks.craft.nbd.fuse import FuseNbdBackend
from vmcraft_tasks.craft.nbd.helpers import AttachResources, process_alive

CHILD = """
import json, sys, time
from vmcraft_tasks.craft.vmcraft import VMCraft
g = VMCraft(sys.argv[1]).launch()
report = g.inspect()
print(json.dumps({"state_dir": g.disk.state_dir, "mounted": len(g.mounts())}), flush=True)
time.sleep(600)
"""


def test_killed_owner_leaves_a_working_disk_that_release_cleans_up(linux_gpt_raw, private_work_dir):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, linux_gpt_raw.path],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, VMCRAFT_WORK_DIR=private_work_dir),
    )
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    state_dir = info["state_dir"]
    res = AttachResources.load(state_dir)
    # The helpers run in their own session: the owner's death did not take them down.
    assert res.qemu_nbd_pid and process_alive(res.qemu_nbd_pid)
    assert res.nbdfuse_pid and process_alive(res.nbdfuse_pid)
    assert sorted(res.loop_devices) == [str(n) for n in range(1, 7)]
    assert len(mounted_under(state_dir)) == info["mounted"] + 1  # guest mounts + the FUSE file

    FuseNbdBackend().release(state_dir)

    assert not os.path.exists(state_dir)
    assert mounted_under(state_dir) == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process_alive(res.qemu_nbd_pid):
        time.sleep(0.05)
    assert not process_alive(res.qemu_nbd_pid) and not process_alive(res.nbdfuse_pid)
