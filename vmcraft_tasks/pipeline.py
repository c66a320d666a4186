"""A VM's pipeline, declared as data: its steps, which flows run them, where they run.

This is the one place that says what happens to a VM. The step runner, the canvas
builder and the docs read it; the task modules only implement steps.

- A **flow** is what was asked for the VM: `inspect` (an image, read-only, nothing
  written), `migrate` (convert, inspect, fix, write the domain), or `dry_run` (as
  migrate, but the fixes are only reported and the converted copy is attached
  read-only). A batch VM's flow follows from its plan; a lone image is `inspect`.
- The **first step of a flow places the VM**: any host takes it from the intake queue
  (a pinned VM's from its host's queue). Every later step runs on that host, where
  the VM's disks are attached.
- A **fan-out** step runs once per filesystem, all at once, joined by a chord whose
  body is the next step.
- An **optional** step runs only when the VM's options turn it on (`options.<name>`).

Pure: no Celery, no Redis. See README "The pipeline" for how to add a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Flow = Literal["inspect", "migrate", "dry_run"]
FLOWS: tuple[Flow, ...] = ("inspect", "migrate", "dry_run")
_ALL: frozenset[Flow] = frozenset(FLOWS)
_MIGRATING: frozenset[Flow] = frozenset({"migrate", "dry_run"})

TASK_PREFIX = "vmcraft.vm."


@dataclass(frozen=True)
class Step:
    name: str
    flows: frozenset[Flow]
    # One task per filesystem, joined by a chord (the next step is its body).
    fan_out: bool = False
    # False: a second run after the first died mid-way could harm the guest (the
    # fix step edits the converted copy); such a redelivery ends the VM failed.
    rerunnable: bool = True
    # The VM option that turns the step on; None: always part of its flows.
    option: str | None = None

    @property
    def task(self) -> str:
        """The Celery task name that implements the step."""
        return TASK_PREFIX + self.name


STEPS: tuple[Step, ...] = (
    Step("start", _MIGRATING),
    Step("convert", _MIGRATING),
    Step("attach", _ALL),
    Step("scan", _ALL),
    Step("mount_partition", _ALL, fan_out=True),
    Step("inspect", _ALL),
    Step("fix", _MIGRATING, rerunnable=False),
    Step("detach", _ALL),
    Step("finalize", _ALL),
    # Boots the converted disks headless and judges the console; a dry run has
    # nothing fixed to boot.
    Step("boot_check", frozenset({"migrate"}), option="boot_check"),
)

# The errback every host-side step carries: the VM failed in some step, it still ends
# through the one ending (released, accounted, reported, next VM started).
FAILED_TASK = TASK_PREFIX + "detach_on_error"

_BY_NAME = {step.name: step for step in STEPS}
_BY_TASK = {step.task: step for step in STEPS}


class UnknownStepError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no step {name!r} in the pipeline")


def step(name: str) -> Step:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownStepError(name) from None


def step_of_task(task_name: str) -> Step | None:
    """The step a Celery task implements (None: not a pipeline step, e.g. the errback)."""
    return _BY_TASK.get(task_name)


def flow_of(plan: Mapping[str, Any] | None) -> Flow:
    """A batch VM's flow from its (trusted) plan; no plan: a lone image, inspected."""
    if plan is None:
        return "inspect"
    return "dry_run" if plan.get("dry_run") else "migrate"


def steps_for(flow: Flow, options: Mapping[str, Any] | None = None) -> tuple[Step, ...]:
    """The steps a VM of this flow runs, in order."""
    opts = options or {}
    return tuple(
        s for s in STEPS if flow in s.flows and (s.option is None or bool(opts.get(s.option)))
    )


def placing_step(flow: Flow) -> Step:
    """The step that places the VM on a host (taken from the intake queue)."""
    return steps_for(flow)[0]


def after(current: str, flow: Flow, options: Mapping[str, Any] | None = None) -> tuple[Step, ...]:
    """The steps that follow `current` in this flow."""
    names = [s.name for s in steps_for(flow, options)]
    if current not in names:
        raise UnknownStepError(f"{current} (in flow {flow})")
    return steps_for(flow, options)[names.index(current) + 1 :]


@dataclass(frozen=True)
class HandOn:
    """What a step hands its VM on to: the next step alone (it hands on in turn), or
    the whole rest of the flow as one chain (fan-out and all)."""

    steps: tuple[Step, ...]
    whole_rest: bool


def hand_on(current: str, flow: Flow, options: Mapping[str, Any] | None = None) -> HandOn:
    """Until the fan-out's width is known (the scan counts the filesystems), each step
    hands the VM to the next one by replacing itself; the step right before the
    fan-out builds the rest as one chain, each piece pinned, because a canvas that
    replaces a task loses whatever followed that task in the caller's chain."""
    rest = after(current, flow, options)
    if not rest:
        return HandOn((), whole_rest=True)
    if rest[0].fan_out or not any(s.fan_out for s in rest):
        return HandOn(rest, whole_rest=True)
    return HandOn(rest[:1], whole_rest=False)


def describe(flow: Flow, options: Mapping[str, Any] | None = None) -> str:
    """One line: the flow's steps in order, fan-outs marked (for docs and logs)."""
    parts = [f"{s.name}[per filesystem]" if s.fan_out else s.name for s in steps_for(flow, options)]
    return " -> ".join(parts)
