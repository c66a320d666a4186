"""vmcraft-tasks: a Celery fleet that prepares VM disk images for migration to KVM.

`celery -A vmcraft_tasks worker` finds the app as `vmcraft_tasks.app`. It is loaded
lazily so that importing the VMCraft library (`vmcraft_tasks.craft`) never imports
Celery or Redis.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from vmcraft_tasks.celery_app import app

        return app
    raise AttributeError(f"module 'vmcraft_tasks' has no attribute {name!r}")
