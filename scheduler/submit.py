"""Submitting work to the fleet and waiting for it, for orchestrators and the CLI."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import redis

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.jobs import JobRecord, JobStore
from vmcraft_tasks.queues import INTAKE_QUEUE
from worker.registry import list_hosts

ATTACH_TASK = "vmcraft.vm.attach"


class NoHostOnlineError(RuntimeError):
    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        super().__init__(
            f"no conversion host is online on {broker_url}: "
            "start one with `celery -A vmcraft_tasks worker`"
        )


@dataclass
class FleetClient:
    settings: FleetSettings

    @classmethod
    def from_env(cls) -> FleetClient:
        return cls(FleetSettings.from_env())

    def __post_init__(self) -> None:
        from vmcraft_tasks.celery_app import create_app

        self.state = redis.Redis.from_url(self.settings.broker_url)
        self.jobs = JobStore(self.state)
        # A client app bound to these settings, whatever the process environment says.
        self.app = create_app(self.settings)

    def online_hosts(self) -> list[str]:
        return [h.host_id for h in list_hosts(self.state) if h.online]

    def submit_inspect(self, image: str, *, job_id: str | None = None) -> str:
        """Queue one image for inspection on any host with a free slot; returns the job id."""
        if not self.online_hosts():
            raise NoHostOnlineError(self.settings.broker_url)
        job_id = job_id or uuid.uuid4().hex
        image = os.path.abspath(image)
        self.jobs.create(job_id, image)
        self.app.send_task(
            ATTACH_TASK,
            args=[{"job_id": job_id, "image": image}],
            queue=INTAKE_QUEUE,
            task_id=f"{job_id}-attach",
        )
        return job_id

    def wait(self, job_id: str, timeout_s: float) -> JobRecord:
        return self.jobs.wait(job_id, timeout_s)

    def close(self) -> None:
        self.state.close()
        self.app.close()
