"""The Celery app: configuration only. Tasks live in `vmcraft_tasks.tasks`."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.queues import INTAKE_QUEUE, declared_queues

# One module per step (see vmcraft_tasks.pipeline); the package imports its hooks.
TASK_MODULES = [
    "vmcraft_tasks.tasks.start",
    "vmcraft_tasks.tasks.convert",
    "vmcraft_tasks.tasks.attach",
    "vmcraft_tasks.tasks.scan",
    "vmcraft_tasks.tasks.mount",
    "vmcraft_tasks.tasks.inspect",
    "vmcraft_tasks.tasks.fix",
    "vmcraft_tasks.tasks.finish",
    "vmcraft_tasks.tasks.boot",
]


# Publishing (a step handing the VM to its next step, a chord's callback) rides out a
# short broker outage instead of failing the VM: about 20 s of retries.
PUBLISH_RETRY_POLICY = {
    "max_retries": 12,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """One configuration for workers, the scheduler, the CLI and Flower (pure)."""
    # The visibility timeout stays above the longest step (the conversion's limit,
    # checked in FleetSettings): kombu redelivers an unacknowledged message once it is
    # older than this, even while its worker still runs it, and a step must never run
    # twice at once. It is only the last resort: the hosts' reconcilers redeliver the
    # messages of dead workers within a heartbeat or two (worker.reconcile).
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Bounded sockets: a half-open connection to a broker that went away must
        # not hang a worker; kombu reconnects on the error.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
    }
    # Celery 5.7's Redis result backend reads only sentinel settings, `retry_policy`,
    # `result_chord_ordered`, `global_keyprefix` and `additional_connection_errors`
    # from these options; a visibility timeout here would mean nothing.
    backend_transport = {
        "retry_policy": {
            "max_retries": 12,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
    }
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        # A worker started while Redis is down keeps trying instead of exiting, and so
        # does one whose connection drops: the fleet must come back by itself.
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        # Storing a result (and a chord part) retries through an outage as well.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 12,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "redis_socket_timeout": 30,
        "redis_socket_connect_timeout": 5,
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
        # A broker blip must not kill running steps: a conversion may have copied for
        # hours. Steps keep running (their own Redis calls retry through the outage);
        # an acknowledgement lost with the old connection leaves a stale message the
        # reconciler drops, because the step ledger says the step already ran.
        # (True would terminate every running step, whose messages then wait in
        # `unacked` for the visibility timeout.)
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    if urlsplit(settings.broker_url).scheme in ("redis", "rediss"):
        # kombu's Redis transport with a restore of unacked messages that cannot crash
        # the consumer (worker.transport).
        config["broker_transport"] = "worker.transport:Transport"
    return config


def create_app(settings: FleetSettings | None = None) -> Celery:
    settings = settings or FleetSettings.from_env()
    app = Celery("vmcraft_tasks", include=TASK_MODULES)
    app.conf.update(celery_config(settings))
    app.conf.vmcraft_settings = settings
    # Worker start/stop concerns: host queue, reconciler, heartbeat, warm shutdown.
    from worker import signals

    signals.install(app)

    return app


app = create_app()
