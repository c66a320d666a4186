"""Worker start/stop: host queue, reconciler, heartbeat, clean warm shutdown.

Connected when the Celery app is created; the handlers run only in worker
processes (clients such as the CLI and Flower never send these signals).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import celeryd_after_setup, worker_init, worker_ready, worker_shutdown

from vmcraft_tasks.queues import host_queue
from worker.reconcile import read_job_marker, reconcile
from worker.registry import Heartbeat, HostInfo
from worker.runtime import WORKER_PID_ENV, runtime

log = logging.getLogger(__name__)

_heartbeat: Heartbeat | None = None
_started_at = time.time()


@celeryd_after_setup.connect
def consume_host_queue(sender: Any, instance: Any, **_: Any) -> None:
    """A plain `celery -A vmcraft_tasks worker` consumes its own host queue too."""
    queue = host_queue(runtime().host_id)
    instance.app.amqp.queues.select_add(queue)
    log.info("consuming %s", queue)


@worker_init.connect
def reconcile_on_start(sender: Any = None, **_: Any) -> None:
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    rt = runtime()
    os.makedirs(rt.host_work_dir, mode=0o700, exist_ok=True)
    report = reconcile(
        rt,
        reason=f"worker of host {rt.host_id} died while the VM was in flight; "
        "its disk was released when the host's worker restarted",
    )
    if report.released_attaches or report.released_leases:
        log.warning(
            "reconciled host %s: released %d attaches, %d leases; failed jobs %s",
            rt.host_id,
            len(report.released_attaches),
            len(report.released_leases),
            report.failed_jobs,
        )


def _host_info() -> HostInfo:
    rt = runtime()
    return HostInfo.from_settings(
        rt.settings,
        backend=rt.craft_settings.backend,
        free_slots=rt.leases.free_count(),
        pids=(rt.worker_pid,),
        started_at=_started_at,
    )


def _refresh_leases() -> None:
    rt = runtime()
    owners = {str(read_job_marker(d).get("job_id")) for d in _host_attaches()}
    rt.leases.refresh_all(owners)


def _host_attaches() -> list[str]:
    from vmcraft_tasks.craft.nbd.reap import attach_state_dirs

    return attach_state_dirs(runtime().host_work_dir)


@worker_ready.connect
def start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    rt = runtime()
    _heartbeat = Heartbeat(
        rt.state,
        _host_info,
        interval_s=rt.settings.heartbeat_s,
        ttl_s=rt.settings.lease_ttl_s,
        on_beat=_refresh_leases,
    )
    _heartbeat.start()


@worker_shutdown.connect
def detach_on_shutdown(sender: Any = None, **_: Any) -> None:
    """Warm shutdown: running steps have finished; release what is still attached."""
    rt = runtime()
    if _heartbeat is not None:
        _heartbeat.stop(withdraw=True)
    reconcile(
        rt,
        reason=f"host {rt.host_id} shut down while the VM was in flight; its disk was released",
    )
