"""Celery tasks: the steps of a VM's pipeline (declared in `vmcraft_tasks.pipeline`).

One module per step (or per tightly bound pair), none importing another; the step
runner (`runner`) and its hooks (`hooks`, registered here so that no worker runs a
step without them) are shared.
"""

from vmcraft_tasks.tasks import hooks as _hooks  # noqa: F401
