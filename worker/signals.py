"""Worker start/stop: host queue, reconciler, heartbeat, clean warm shutdown.

Connected when the Celery app is created; the handlers run only in worker
processes (clients such as the CLI and Flower never send these signals).

- start (`worker_init`, before the worker consumes): the reconciler releases what a
  killed worker of this host left behind and redelivers its steps;
- every heartbeat (`worker_ready` starts it): the host is re-registered (even when
  Redis came back empty), the reconciler runs, and every few beats one worker of the
  fleet runs the batch watchdog;
- SIGTERM (`worker_shutting_down`, in the main process): running conversions are
  asked to stop, so a warm shutdown does not wait for an hours-long copy;
- warm shutdown done (`worker_shutdown`): what is still in flight here ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Any

import redis
from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from vmcraft_tasks import keys
from vmcraft_tasks.queues import host_queue
from worker import conversions
from worker.broker import job_id_of
from worker.reconcile import BEAT, START, STOP, HeldTask, Reconciler
from worker.registry import Heartbeat, HostInfo
from worker.runtime import WORKER_PID_ENV, runtime
from worker.watchdog import BatchWatchdog

log = logging.getLogger(__name__)

# Keeping running steps through a broker connection loss is deliberate (see
# `worker_cancel_long_running_tasks_on_connection_loss` in celery_app): Celery's nag
# about the default changing in 6.0 would be logged on every reconnect.
warnings.filterwarnings(
    "ignore", message=r"\s*In Celery 5\.1 we introduced an optional breaking change"
)

# The batch watchdog runs at most this often (and never more often than every 5
# heartbeats): it reads every open batch.
WATCHDOG_MIN_INTERVAL_S = 5.0

_app: Celery | None = None
_heartbeat: Heartbeat | None = None
_reconciler: Reconciler | None = None
_watchdog: BatchWatchdog | None = None
_started_at = time.time()


def install(app: Celery) -> None:
    """The fleet's Celery app, for what the host runtime sends (a batch's next VM, a
    requeue); the app calls this when it is created. The handlers below are connected
    on import."""
    global _app
    _app = app


def _the_app() -> Celery:
    if _app is None:
        raise RuntimeError("worker.signals.install(app) was not called")
    return _app


@celeryd_after_setup.connect
def consume_host_queue(sender: Any, instance: Any, **_: Any) -> None:
    """A plain `celery -A vmcraft_tasks worker` consumes its own host queue too."""
    queue = host_queue(runtime().host_id)
    instance.app.amqp.queues.select_add(queue)
    log.info("consuming %s", queue)


def held_tasks() -> list[HeldTask]:
    """Every request this worker holds in memory: running, reserved (prefetched) and
    scheduled (an ETA, such as a host-full retry), as (task id, task name, retries,
    job id). Only the main process knows them; the reconciler does not redeliver what
    a live worker holds (and checks them against the step ledger)."""
    from celery.worker import state

    found: list[HeldTask] = []
    for group in (state.active_requests, state.reserved_requests, state.scheduled_requests):
        requests: list[Any] = []
        for _ in range(50):
            try:
                requests = list(group)  # the event loop may change it meanwhile
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("could not read the worker's requests")
        for request in requests:
            try:
                job = job_id_of(request.args)
            except Exception:
                job = None
            retries = int((getattr(request, "request_dict", None) or {}).get("retries") or 0)
            found.append((str(request.id), str(request.task_name), retries, job))
    return found


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        _reconciler = Reconciler(runtime(), held=held_tasks, app=_the_app())
    return _reconciler


@worker_init.connect
def reconcile_on_start(sender: Any = None, **_: Any) -> None:
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    rt = runtime()
    os.makedirs(rt.host_work_dir, mode=0o700, exist_ok=True)
    conversions.clear_stop(rt.host_work_dir)
    reconciler().run(
        START,
        reason=f"worker of host {rt.host_id} died while the VM was in flight",
    )


def _host_info() -> HostInfo:
    rt = runtime()
    return HostInfo.from_settings(
        rt.settings,
        backend=rt.craft_settings.backend,
        free_slots=rt.probe_leases.free_count(),
        pids=(rt.worker_pid,),
        started_at=_started_at,
    )


def _on_beat() -> None:
    reconciler().run(BEAT)
    if _watchdog is not None:
        _watchdog.maybe_run()


@worker_ready.connect
def start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat, _watchdog
    rt = runtime()
    _watchdog = BatchWatchdog(
        rt.probe,
        _the_app(),
        owner=f"{rt.host_id}:{rt.worker_pid}",
        interval_s=max(WATCHDOG_MIN_INTERVAL_S, 5 * rt.settings.heartbeat_s),
        lease_ttl_s=rt.settings.lease_ttl_s,
    )
    _heartbeat = Heartbeat(
        rt.probe,
        _host_info,
        interval_s=rt.settings.heartbeat_s,
        ttl_s=rt.settings.lease_ttl_s,
        on_beat=_on_beat,
    )
    # Redis may be down right now: the host registers itself once it is back.
    _heartbeat.start(first_must_succeed=False)


@worker_shutting_down.connect
def stop_conversions(sig: Any = None, how: Any = None, **_: Any) -> None:
    """SIGTERM reached the main process: conversions stop within a second or two and
    hand their VMs back resumable (see `worker.conversions`)."""
    rt = runtime()
    reason = f"host {rt.host_id} is shutting down ({how or 'warm'} shutdown, {sig or 'signal'})"
    try:
        conversions.request_stop(rt.host_work_dir, rt.worker_pid, reason)
    except OSError as exc:
        log.warning("could not ask conversions to stop: %s", exc)


@worker_shutdown.connect
def detach_on_shutdown(sender: Any = None, **_: Any) -> None:
    """Warm shutdown: running steps have finished; release what is still attached."""
    rt = runtime()
    if _heartbeat is not None:
        try:
            _heartbeat.stop(withdraw=True)
        except redis.RedisError as exc:
            log.warning("could not withdraw host %s from the registry: %s", rt.host_id, exc)
    reconciler().run(STOP, reason=f"host {rt.host_id} shut down while the VM was in flight")
    with contextlib.suppress(redis.RedisError):
        rt.probe.delete(keys.host_tasks_key(rt.host_id))
    conversions.clear_stop(rt.host_work_dir)
