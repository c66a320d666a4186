"""Submitting work to the fleet and waiting for it, for orchestrators and the CLI."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from kombu.exceptions import OperationalError

from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.jobs import JobRecord, JobStore
from vmcraft_tasks.queues import INTAKE_QUEUE
from vmcraft_tasks.urls import mask_url, mask_urls_in
from worker.registry import list_hosts

ATTACH_TASK = "vmcraft.vm.attach"

# redis-py says "Error 111 connecting to host:6379. Connection refused."; the message
# names the URL itself, so only the reason is kept.
_REDIS_PREFIX = re.compile(
    r"^Error -?\d+ (?:connecting to (?:unix socket: )?\S+?|while writing to socket)\.\s+"
)


class NoHostOnlineError(RuntimeError):
    def __init__(self, broker_url: str) -> None:
        # Only ever shown: keep the masked form, so no caller can print the password.
        self.broker_url = mask_url(broker_url)
        super().__init__(
            f"no conversion host is online on {self.broker_url}: "
            "start one with `celery -A vmcraft_tasks worker`"
        )


class FleetSettingsError(ValueError):
    """The VMCRAFT_* settings are invalid (a bad number, inconsistent time limits)."""


class BrokerUnavailableError(RuntimeError):
    """The fleet's Redis cannot be reached, refused the login, or failed a request.

    One line, the URL masked: `cannot reach the broker at redis://:***@host:6379/0:
    Connection refused`. `__cause__` keeps redis-py's (or kombu's) exception.
    """

    def __init__(self, url: str, exc: BaseException) -> None:
        self.url = mask_url(url)
        self.reason = _reason(url, exc)
        if isinstance(exc, redis.AuthenticationError):
            message = f"cannot log in to the broker at {self.url}: {self.reason}"
        elif isinstance(exc, redis.ConnectionError | redis.TimeoutError | OperationalError):
            message = f"cannot reach the broker at {self.url}: {self.reason}"
        elif isinstance(exc, redis.ResponseError):
            message = f"the broker at {self.url} refused the request: {self.reason}"
        else:  # a protocol error: whatever listens there is not a Redis server
            message = f"the broker at {self.url} gave an unusable answer: {self.reason}"
        super().__init__(message)


def _reason(url: str, exc: BaseException) -> str:
    if isinstance(exc, redis.AuthenticationError) and not (urlsplit(url).password or ""):
        # redis-py's text for this case is about HELLO and RESP versions.
        return "it requires a password and the URL has none (redis://:PASSWORD@host:port/db)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _REDIS_PREFIX.sub("", text).rstrip(".")
    # Server and library messages may quote a URL of their own.
    return mask_urls_in(text)


BROKER_ERRORS = (redis.RedisError, OperationalError)


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Turn redis-py's and kombu's errors about the broker at `url` into one
    `BrokerUnavailableError` with the URL masked, for callers that print errors."""
    try:
        yield
    except BROKER_ERRORS as exc:
        raise BrokerUnavailableError(url, exc) from exc


@dataclass
class FleetClient:
    settings: FleetSettings

    @classmethod
    def from_env(cls) -> FleetClient:
        try:
            settings = FleetSettings.from_env()
        except ValueError as exc:
            raise FleetSettingsError(f"invalid fleet settings: {mask_urls_in(str(exc))}") from exc
        return cls(settings)

    def __post_init__(self) -> None:
        from vmcraft_tasks.celery_app import create_app

        self.state = redis.Redis.from_url(self.settings.broker_url, decode_responses=True)
        self.jobs = JobStore(self.state)
        # A client app bound to these settings, whatever the process environment says.
        self.app = create_app(self.settings)

    def broker_errors(self) -> AbstractContextManager[None]:
        """`broker_errors` for this client's broker."""
        return broker_errors(self.settings.broker_url)

    def ping(self) -> None:
        """Raise `BrokerUnavailableError` unless the broker answers."""
        with self.broker_errors():
            self.state.ping()

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
