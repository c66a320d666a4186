"""Real Flower against the test Redis finds the workers and a finished task."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from scheduler.submit import FleetClient
from vmcraft_tasks.embedded.fleet import kill_group
from vmcraft_tasks.embedded.redis import free_port


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen in {timeout_s} s (last: {last!r})")


def test_flower_shows_workers_and_a_finished_task(fleet_factory, overlay, linux_gpt_raw, tmp_path):
    fleet = fleet_factory(["h1", "h2"])
    env = fleet.env()
    port = free_port()
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        flower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "vmcraft_tasks",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                "--unauthenticated_api",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Flower 2 refuses API calls without auth unless told otherwise; tests only.
            env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    client = FleetClient(fleet.settings())
    try:
        workers = wait_for(
            lambda: (
                {name for name in get_json(f"{base}/api/workers?refresh=1")}
                if len(get_json(f"{base}/api/workers?refresh=1")) >= 2
                else None
            ),
            60,
            "both workers in Flower",
        )
        assert {w.split("@")[0] for w in workers} == {"h1", "h2"}

        job = client.submit_inspect(overlay(linux_gpt_raw.path))
        record = client.wait(job, timeout_s=60)
        assert record.status == "done"
        attach_id = f"{job}-attach"

        def finished_task():
            info = get_json(f"{base}/api/task/info/{attach_id}")
            return info if info.get("state") == "SUCCESS" else None

        # The VM's task id ends up naming its last step: each step replaces itself
        # with the rest of the workflow, and the result follows.
        info = wait_for(finished_task, 30, "the VM's finished task")
        assert info["name"] == "vmcraft.vm.finalize"
        assert info["worker"].split("@")[0] == record.host
        tasks = get_json(f"{base}/api/tasks?limit=500")
        # Every step of the VM shares the workflow's root: the first task's id.
        mine = [t for t in tasks.values() if t.get("root_id") == attach_id]
        # attach and scan replaced themselves: their id lives on in the final step.
        assert {t["name"] for t in mine} >= {
            "vmcraft.vm.mount_partition",
            "vmcraft.vm.inspect",
            "vmcraft.vm.detach",
            "vmcraft.vm.finalize",
        }
        assert {t["worker"].split("@")[0] for t in mine} == {record.host}
        assert all(t["state"] == "SUCCESS" for t in mine)
    finally:
        client.close()
        flower.terminate()
        try:
            flower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            flower.kill()
        kill_group(flower.pid)
