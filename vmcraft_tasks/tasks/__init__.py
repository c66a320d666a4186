"""Celery tasks: thin steps over `craft/` and `worker/` that take and return small JSON."""
