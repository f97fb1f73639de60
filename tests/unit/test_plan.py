import pytest
from pydantic import ValidationError

from schemas.plan import Plan
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
