"""The pipeline declaration: flows, placement, hand-offs (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from vmcraft_tasks import pipeline


def names(steps):
    return [s.name for s in steps]


def test_each_flow_runs_its_steps_in_order():
    assert names(pipeline.steps_for("inspect")) == [
        "attach",
        "scan",
        "mount_partition",
        "inspect",
        "detach",
        "finalize",
    ]
    migrate = ["start", "convert", "attach", "scan", "mount_partition", "inspect", "fix"]
    assert names(pipeline.steps_for("migrate")) == [*migrate, "detach", "finalize"]
    assert names(pipeline.steps_for("dry_run")) == names(pipeline.steps_for("migrate"))


def test_the_first_step_places_the_vm():
    assert pipeline.placing_step("inspect").name == "attach"
    assert pipeline.placing_step("migrate").name == "start"


def test_flow_follows_the_plan():
    assert pipeline.flow_of(None) == "inspect"
    assert pipeline.flow_of({"dry_run": False}) == "migrate"
    assert pipeline.flow_of({"dry_run": True}) == "dry_run"


def test_steps_hand_on_one_by_one_until_the_fan_out_width_is_known():
    to_convert = pipeline.hand_on("start", "migrate")
    assert names(to_convert.steps) == ["convert"] and not to_convert.whole_rest
    assert names(pipeline.hand_on("attach", "inspect").steps) == ["scan"]
    rest = pipeline.hand_on("scan", "migrate")
    assert rest.whole_rest
    assert names(rest.steps) == ["mount_partition", "inspect", "fix", "detach", "finalize"]
    assert names(pipeline.hand_on("scan", "inspect").steps) == [
        "mount_partition",
        "inspect",
        "detach",
        "finalize",
    ]


def test_the_last_step_hands_on_nothing_and_unknown_steps_are_named():
    assert pipeline.hand_on("finalize", "migrate").steps == ()
    with pytest.raises(pipeline.UnknownStepError, match="fix"):
        pipeline.after("fix", "inspect")
    with pytest.raises(pipeline.UnknownStepError, match="nope"):
        pipeline.step("nope")


def test_task_names_and_the_steps_they_implement():
    fix = pipeline.step("fix")
    assert fix.task == "vmcraft.vm.fix" and not fix.rerunnable
    assert pipeline.step_of_task("vmcraft.vm.fix") is fix
    assert pipeline.step_of_task(pipeline.FAILED_TASK) is None
    assert len({s.task for s in pipeline.STEPS}) == len(pipeline.STEPS)


def test_the_boot_check_runs_only_when_its_option_is_on_and_only_in_a_migration():
    assert "boot_check" not in names(pipeline.steps_for("migrate"))
    assert "boot_check" not in names(pipeline.steps_for("migrate", {"boot_check": False}))
    assert names(pipeline.steps_for("migrate", {"boot_check": True}))[-1] == "boot_check"
    # A dry run fixes nothing that could be booted; a lone inspection has no domain.
    assert "boot_check" not in names(pipeline.steps_for("dry_run", {"boot_check": True}))
    assert "boot_check" not in names(pipeline.steps_for("inspect", {"boot_check": True}))
    after_finalize = pipeline.hand_on("finalize", "migrate", {"boot_check": True})
    assert names(after_finalize.steps) == ["boot_check"]
    rest = pipeline.hand_on("scan", "migrate", {"boot_check": True})
    assert names(rest.steps)[-2:] == ["finalize", "boot_check"]
    assert pipeline.step("boot_check").rerunnable  # snapshot=on: booting writes nothing


def test_describe_marks_the_fan_out():
    line = pipeline.describe("inspect")
    assert line.startswith("attach -> scan -> mount_partition[per filesystem] -> inspect")
    assert dataclasses.is_dataclass(pipeline.step("scan"))
