import json

import pytest
from pydantic import ValidationError

from schemas.plan import MAX_DEPTH, MAX_FAN_IN, MAX_FAN_OUT, MAX_TASKS, Plan
from services.orchestrator.logic import parse_plan, ready_tasks, sink_tasks

KINDS = {"researcher", "writer"}


def plan_json(*tasks: str) -> str:
    return '{"tasks": [' + ",".join(tasks) + "]}"


def test_a_valid_plan_keeps_its_tasks_and_dependencies() -> None:
    plan = parse_plan(
        plan_json(
            '{"id": "r1", "kind": "researcher", "instruction": "find x"}',
            '{"id": "w1", "kind": "writer", "instruction": "write", "depends_on": ["r1"]}',
        ),
        KINDS,
    )
    assert [t.id for t in plan.tasks] == ["r1", "w1"]
    assert [t.id for t in sink_tasks(plan)] == ["w1"]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (['{"id": "a", "kind": "researcher", "instruction": "x"}'] * 2, "unique"),
        (['{"id": "a", "kind": "researcher", "instruction": "x", "depends_on": ["zz"]}'], "unknown tasks"),
        (['{"id": "a", "kind": "researcher", "instruction": "x", "depends_on": ["a"]}'], "itself"),
        (
            [
                '{"id": "a", "kind": "researcher", "instruction": "x", "depends_on": ["b"]}',
                '{"id": "b", "kind": "researcher", "instruction": "y", "depends_on": ["a"]}',
            ],
            "cycle",
        ),
        (['{"id": "a", "kind": "poet", "instruction": "x"}'], "unknown agent kinds"),
        (['{"id": "a", "kind": "researcher", "instruction": ""}'], "at least 1 character"),
    ],
)
def test_an_invalid_plan_is_rejected_with_a_reason(tasks: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_plan(plan_json(*tasks), KINDS)


def chain(length: int) -> list[str]:
    """t0 <- t1 <- ... : each task depends on the one before."""
    return [
        json.dumps({"id": f"t{i}", "kind": "researcher", "instruction": "x", "depends_on": [f"t{i - 1}"] if i else []})
        for i in range(length)
    ]


def test_a_plan_as_deep_as_the_limit_is_valid_and_one_deeper_is_not() -> None:
    assert len(parse_plan(plan_json(*chain(MAX_DEPTH)), KINDS).tasks) == MAX_DEPTH
    with pytest.raises(ValueError, match=f"deeper than {MAX_DEPTH} tasks"):
        parse_plan(plan_json(*chain(MAX_DEPTH + 1)), KINDS)


def test_depth_counts_the_longest_chain_not_the_number_of_tasks() -> None:
    wide = [f'{{"id": "r{i}", "kind": "researcher", "instruction": "x"}}' for i in range(MAX_TASKS - 1)]
    deps = ", ".join(f'"r{i}"' for i in range(MAX_FAN_IN))
    writer = f'{{"id": "w1", "kind": "writer", "instruction": "y", "depends_on": [{deps}]}}'
    assert len(parse_plan(plan_json(*wide, writer), KINDS).tasks) == MAX_TASKS


def test_a_task_may_depend_on_at_most_max_fan_in_tasks() -> None:
    sources = [f'{{"id": "r{i}", "kind": "researcher", "instruction": "x"}}' for i in range(MAX_FAN_IN + 1)]
    deps = ", ".join(f'"r{i}"' for i in range(MAX_FAN_IN + 1))
    writer = f'{{"id": "w1", "kind": "writer", "instruction": "y", "depends_on": [{deps}]}}'
    with pytest.raises(ValidationError, match=f"at most {MAX_FAN_IN} items"):
        parse_plan(plan_json(*sources, writer), KINDS)


def test_at_most_max_fan_out_tasks_may_depend_on_one_task() -> None:
    source = '{"id": "r0", "kind": "researcher", "instruction": "x"}'
    fan = [f'{{"id": "w{i}", "kind": "writer", "instruction": "y", "depends_on": ["r0"]}}' for i in range(MAX_FAN_OUT)]
    assert len(parse_plan(plan_json(source, *fan), KINDS).tasks) == MAX_FAN_OUT + 1
    extra = '{"id": "w99", "kind": "writer", "instruction": "y", "depends_on": ["r0"]}'
    with pytest.raises(ValidationError, match=f"{MAX_FAN_OUT + 1} tasks depend on task 'r0'"):
        parse_plan(plan_json(source, *fan, extra), KINDS)


def test_a_plan_may_have_at_most_max_tasks() -> None:
    tasks = [f'{{"id": "r{i}", "kind": "researcher", "instruction": "x"}}' for i in range(MAX_TASKS + 1)]
    with pytest.raises(ValidationError, match=f"at most {MAX_TASKS} items"):
        parse_plan(plan_json(*tasks), KINDS)


def test_text_that_is_not_json_is_not_a_plan() -> None:
    with pytest.raises(ValidationError):
        parse_plan("Sure! Here is the plan: research, then write.", KINDS)


def test_an_empty_plan_is_rejected() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        Plan.model_validate({"tasks": []})


def test_only_tasks_whose_dependencies_completed_are_ready() -> None:
    from schemas.events import GoalSubmitted
    from services.orchestrator.logic import GoalState, TaskRecord

    plan = parse_plan(
        plan_json(
            '{"id": "r1", "kind": "researcher", "instruction": "a"}',
            '{"id": "r2", "kind": "researcher", "instruction": "b"}',
            '{"id": "w1", "kind": "writer", "instruction": "c", "depends_on": ["r1", "r2"]}',
        ),
        KINDS,
    )
    state = GoalState(
        goal=GoalSubmitted(tenant="t", goal_id="g", text="x"),
        plan=plan,
        tasks={t.id: TaskRecord(planned=t, task_id=f"g.{t.id}") for t in plan.tasks},
    )
    assert [t.planned.id for t in ready_tasks(state)] == ["r1", "r2"]
    state.tasks["r1"].status = "completed"
    state.tasks["r2"].status = "assigned"
    assert ready_tasks(state) == []
    state.tasks["r2"].status = "completed"
    assert [t.planned.id for t in ready_tasks(state)] == ["w1"]
