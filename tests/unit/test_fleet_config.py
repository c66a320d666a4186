from collections.abc import Iterator
from typing import Any

import pytest

from vmcraft_tasks.celery_app import celery_config
from vmcraft_tasks.config import FleetSettings
from vmcraft_tasks.queues import INTAKE_QUEUE, host_queue, pin
from vmcraft_tasks.validation import validate_image_path


def test_settings_from_env_derive_result_and_cache_dbs(monkeypatch):
    monkeypatch.setenv("VMCRAFT_BROKER_URL", "redis://broker:6380/0")
    monkeypatch.delenv("VMCRAFT_RESULT_BACKEND", raising=False)
    monkeypatch.delenv("VMCRAFT_CACHE_URL", raising=False)
    monkeypatch.setenv("VMCRAFT_HOST_ID", "conv-07")
    monkeypatch.setenv("VMCRAFT_IMAGE_ROOTS", "/data/vmware:/data/hyperv")
    monkeypatch.setenv("VMCRAFT_MAX_MOUNTS", "8")
    s = FleetSettings.from_env()
    assert (s.result_backend, s.cache_url) == ("redis://broker:6380/1", "redis://broker:6380/2")
    assert s.host_id == "conv-07" and s.max_mounts == 8
    assert s.image_roots == ("/data/vmware", "/data/hyperv")


def test_bad_numbers_name_the_setting(monkeypatch):
    monkeypatch.setenv("VMCRAFT_MAX_MOUNTS", "lots")
    with pytest.raises(ValueError, match="VMCRAFT_MAX_MOUNTS must be a whole number"):
        FleetSettings.from_env()


def test_time_limits_must_sit_below_the_visibility_timeout():
    with pytest.raises(ValueError, match="soft < hard < broker visibility timeout"):
        FleetSettings(soft_time_limit_s=100, time_limit_s=200, visibility_timeout_s=150)


def test_celery_config_is_json_only_acks_late_and_consistent():
    s = FleetSettings()
    conf = celery_config(s)
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["task_reject_on_worker_lost"]
    assert conf["task_time_limit"] < conf["broker_transport_options"]["visibility_timeout"]
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["task_default_queue"] == INTAKE_QUEUE


def _all_signatures(sig: Any) -> Iterator[Any]:  # Celery signatures carry no types
    yield sig
    for child in getattr(sig, "tasks", None) or []:
        yield from _all_signatures(child)
    body = sig.get("kwargs", {}).get("body") if sig.get("subtask_type") == "chord" else None
    if body is not None:
        yield from _all_signatures(body)
    for key in ("link", "link_error"):
        for callback in sig.options.get(key) or []:
            yield from _all_signatures(callback)


def test_pin_routes_every_part_of_a_canvas_to_one_host():
    from celery import Celery, chain, chord

    app = Celery("t", set_as_current=False)

    @app.task(name="t.a")
    def a(*args):
        return args

    # Celery may fold chain(chord, task) into a chord whose body is a chain: pin
    # must reach every signature whatever shape the canvas takes.
    flow = chain(chord([a.si(1), a.si(2)], a.s()), a.s(), a.s())
    flow.on_error(a.s())
    pin(flow, "h2")
    sigs = list(_all_signatures(flow))
    assert len(sigs) >= 6
    assert {s.options.get("queue") for s in sigs} == {host_queue("h2")}


def test_host_queue_rejects_nonsense():
    with pytest.raises(ValueError):
        host_queue("a/b")


def test_image_path_validation(tmp_path):
    img = tmp_path / "d.qcow2"
    img.write_bytes(b"x")
    assert validate_image_path(str(img), (str(tmp_path),)) == str(img)
    with pytest.raises(ValueError, match="outside the allowed image roots"):
        validate_image_path(str(img), ("/data/vmware",))
    with pytest.raises(ValueError, match="not absolute"):
        validate_image_path("d.qcow2", ())
    with pytest.raises(ValueError, match="no such file"):
        validate_image_path(str(tmp_path / "nope.vmdk"), ())
