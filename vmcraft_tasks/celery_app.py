"""The Celery app: configuration only. Tasks live in `vmcraft_tasks.tasks`."""

from __future__ import annotations

from typing import Any

from celery import Celery

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.queues import INTAKE_QUEUE, declared_queues

TASK_MODULES = ["vmcraft_tasks.tasks.vm", "vmcraft_tasks.tasks.migrate"]


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """One configuration for workers, the scheduler, the CLI and Flower (pure)."""
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message is refused, never executed.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A VM step is never lost with a dying worker, and a worker takes one at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.time_limit_s,
        # Flower sees every task and worker.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # Flower learns that a task started from the task-started event; a STARTED
        # write to the result backend per task would only cost a round trip.
        "task_track_started": False,
        "task_default_queue": INTAKE_QUEUE,
        "task_queues": declared_queues(),
        "task_create_missing_queues": True,
        "result_extended": False,
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }


def create_app(settings: FleetSettings | None = None) -> Celery:
    settings = settings or FleetSettings.from_env()
    app = Celery("vmcraft_tasks", include=TASK_MODULES)
    app.conf.update(celery_config(settings))
    app.conf.vmcraft_settings = settings
    # Worker start/stop concerns: host queue, reconciler, heartbeat, warm shutdown.
    import worker.signals  # noqa: F401

    return app


app = create_app()
