"""Celery canvases built from the pipeline declaration (`vmcraft_tasks.pipeline`).

Signatures are made by task name, so no step module imports another. Every piece
that runs on the VM's host is pinned to that host's queue and carries the errback:
Celery does not reliably pass a chord header's failure to errbacks set on the
canvas, and a VM must never be left attached because one step raised.

Calling convention (what each step receives):
- steps up to the fan-out: the VM context;
- the fan-out step: a slim context, the partition number and its filesystem type;
- the fan-out's body and every step after it: the previous step's result, then the
  context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import chain, chord
from celery.canvas import Signature

from vmcraft_tasks import pipeline
from vmcraft_tasks.celery_app import app
from vmcraft_tasks.models.context import StepContext
from vmcraft_tasks.queues import pin


def errback(ctx: StepContext) -> Signature:
    return app.signature(pipeline.FAILED_TASK, args=(ctx.to_message(),))


def step_signature(step: pipeline.Step, ctx: StepContext, *args: Any, immutable: bool) -> Signature:
    """One step of the VM on its host, with the errback."""
    if ctx.host is None:
        raise ValueError(f"VM {ctx.job_id} has no host yet: {step.name} cannot be pinned")
    sig = app.signature(step.task, args=args, immutable=immutable)
    pinned: Signature = pin(sig.on_error(errback(ctx)), ctx.host)
    return pinned


def hand_on(
    current: str,
    ctx: StepContext,
    flow: pipeline.Flow,
    options: Mapping[str, Any] | None = None,
) -> Signature:
    """What the step `current` replaces itself with (see `pipeline.hand_on`); `options`
    are the VM's (`VMPlan.step_options`), which switch optional steps on."""
    plan = pipeline.hand_on(current, flow, options)
    if not plan.steps:
        raise ValueError(f"{current} is the last step of flow {flow}: nothing to hand on to")
    if not plan.whole_rest:
        (next_step,) = plan.steps
        return step_signature(next_step, ctx, ctx.to_message(), immutable=True)
    return _rest(plan.steps, ctx)


def _rest(steps: tuple[pipeline.Step, ...], ctx: StepContext) -> Signature:
    message = ctx.to_message()
    pieces: list[Signature] = []
    index = 0
    while index < len(steps):
        step = steps[index]
        if step.fan_out:
            body_step = steps[index + 1]
            types = {fs.partition: fs.type for fs in ctx.filesystems}
            slim = ctx.for_mount().to_message()
            header = [
                step_signature(step, ctx, slim, number, types.get(number), immutable=True)
                for number in ctx.mount_targets
            ]
            if header:
                body = step_signature(body_step, ctx, message, immutable=False)
                pieces.append(chord(header, body))
            else:
                pieces.append(step_signature(body_step, ctx, [], message, immutable=True))
            index += 2
            continue
        first = not pieces
        if first:
            pieces.append(step_signature(step, ctx, message, immutable=True))
        else:
            pieces.append(step_signature(step, ctx, message, immutable=False))
        index += 1
    assert ctx.host is not None  # step_signature checked it
    pinned: Signature = pin(chain(*pieces), ctx.host)
    return pinned
