"""The goal's state machine, every pair of states, and the orchestrator's cancel, pause and resume."""

from __future__ import annotations

import itertools

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.events import (
    GoalCompleted,
    GoalLifecycleRejected,
    GoalLifecycleRequested,
    GoalStateChanged,
    GoalStateName,
    LifecycleAction,
    TaskAssigned,
)
from schemas.topics import Topics
from services.orchestrator import logic
from services.orchestrator.lifecycle import STATES, TRANSITIONS, IllegalTransition, requested, transition
from services.runtime.errors import GoalStopped, SwitchboardError
from tests.unit.test_orchestrator import GOAL, completed, make_deps, of

ALLOWED = [
    ("submitted", "planning"), ("submitted", "failed"),
    ("planning", "running"), ("planning", "waiting_for_human"), ("planning", "failed"), ("planning", "cancelled"),
    ("running", "paused"), ("running", "waiting_for_human"), ("running", "completed"), ("running", "failed"),
    ("running", "cancelled"),
    ("paused", "running"), ("paused", "waiting_for_human"), ("paused", "failed"), ("paused", "cancelled"),
    ("waiting_for_human", "completed"), ("waiting_for_human", "cancelled"),
    ("failed", "planning"), ("failed", "running"),
]
"""The table, written out: a change to lifecycle.TRANSITIONS must change this too."""


def test_the_states_are_the_eight_of_the_design() -> None:
    assert set(STATES) == {
        "submitted", "planning", "running", "paused", "waiting_for_human", "completed", "failed", "cancelled",
    }
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == set(ALLOWED)


@pytest.mark.parametrize(("current", "target"), ALLOWED)
def test_an_allowed_transition_returns_its_target(current: GoalStateName, target: GoalStateName) -> None:
    assert transition("g-1", current, target) == target


@pytest.mark.parametrize(
    ("current", "target"), [p for p in itertools.product(STATES, STATES) if p not in ALLOWED]
)
def test_every_other_transition_is_rejected_naming_both_states(current: GoalStateName, target: GoalStateName) -> None:
    with pytest.raises(IllegalTransition) as caught:
        transition("g-1", current, target)
    assert str(caught.value).startswith(f"goal g-1 is {current}; it cannot become {target}")
    assert (caught.value.current, caught.value.target) == (current, target)
    assert isinstance(caught.value, SwitchboardError) and isinstance(caught.value, ValueError)


def test_an_ended_goal_says_so() -> None:
    with pytest.raises(IllegalTransition, match=r"^goal g-1 is completed; it cannot become paused \(it has ended\)$"):
        transition("g-1", "completed", "paused")


REQUESTS: dict[LifecycleAction, tuple[set[str], str]] = {
    "cancel": ({"planning", "running", "paused", "waiting_for_human"}, "cancelled"),
    "pause": ({"running"}, "paused"),
    "resume": ({"paused"}, "running"),
    "answer": ({"waiting_for_human"}, "completed"),
}


@pytest.mark.parametrize(("action", "current"), list(itertools.product(REQUESTS, STATES)))
def test_a_request_moves_only_from_the_states_it_applies_to(action: LifecycleAction, current: GoalStateName) -> None:
    allowed, target = REQUESTS[action]
    if current in allowed:
        assert requested("g-1", current, action) == target
    else:
        done = {"cancel": "cancelled", "pause": "paused", "resume": "resumed", "answer": "answered"}[action]
        with pytest.raises(IllegalTransition, match=rf"^goal g-1 is {current}; it cannot be {done} "):
            requested("g-1", current, action)


def asked(action: LifecycleAction, goal_id: str = "g1") -> GoalLifecycleRequested:
    return GoalLifecycleRequested(tenant="acme", goal_id=goal_id, action=action, requested_by="ops@test", reason="test")


async def state_of(deps: logic.OrchestratorDeps) -> str:
    stored = await deps.ledger.store.load(deps.keys.goal_state("acme", "g1"))
    assert stored is not None
    return stored.status


async def test_cancel_stops_every_task_keeps_late_results_and_starts_nothing(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    [changed] = of(await logic.change_lifecycle(deps, asked("cancel")), GoalStateChanged)
    assert (changed.from_state, changed.to_state, changed.requested_by) == ("running", "cancelled", "ops@test")
    with pytest.raises(GoalStopped):  # every task, on every replica, stops at its next model call
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)
    # r1's call was in flight: its result is kept, and the writer after it does not start.
    assert await logic.record_task_result(deps, completed(r1, "2+2 = 4")) == []
    assert await logic.record_task_result(deps, completed(r2, "Redis is a store")) == []
    stored = await deps.ledger.store.load(keys.goal_state("acme", "g1"))
    assert stored is not None and stored.status == "cancelled"
    assert {p: t.status for p, t in stored.tasks.items()} == {"r1": "completed", "r2": "completed", "w1": "pending"}
    assert stored.tasks["r1"].result == "2+2 = 4"


async def test_pause_then_resume_resends_stopped_tasks_starts_dependants_and_completes(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    [paused] = of(await logic.change_lifecycle(deps, asked("pause")), GoalStateChanged)
    assert (paused.from_state, paused.to_state) == ("running", "paused")
    with pytest.raises(GoalStopped):
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)
    assert await logic.record_task_result(deps, completed(r1, "2+2 = 4")) == []  # finished while paused
    assert await state_of(deps) == "paused"

    outputs = await logic.change_lifecycle(deps, asked("resume"))
    [resumed] = of(outputs, GoalStateChanged)
    assert (resumed.from_state, resumed.to_state) == ("paused", "running")
    [again] = of(outputs, TaskAssigned)
    assert again.task_id == "g1.r2" and again.resume  # r2 continues from its checkpoint; r1 is not redone
    await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)  # runs again

    [writer] = of(await logic.record_task_result(deps, completed(r2, "Redis is a store")), TaskAssigned)
    assert not writer.resume and writer.inputs == {"r1": "2+2 = 4", "r2": "Redis is a store"}
    [done] = of(await logic.record_task_result(deps, completed(writer, "4; Redis is a store")), GoalCompleted)
    assert done.answer == "4; Redis is a store"
    assert await state_of(deps) == "completed"


async def test_a_resume_after_every_task_finished_while_paused_answers_the_goal(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    await logic.record_task_result(deps, completed(r1, "2+2 = 4"))
    [writer] = of(await logic.record_task_result(deps, completed(r2, "Redis is a store")), TaskAssigned)
    await logic.change_lifecycle(deps, asked("pause"))
    assert await logic.record_task_result(deps, completed(writer, "4; Redis is a store")) == []
    [done] = of(await logic.change_lifecycle(deps, asked("resume")), GoalCompleted)
    assert done.answer == "4; Redis is a store"


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        ([], "resume", "goal g1 is running; it cannot be resumed (only a goal that is paused can)"),
        (["pause"], "pause", "goal g1 is paused; it cannot be paused (only a goal that is running can)"),
        (["cancel"], "resume", "goal g1 is cancelled; it cannot be resumed (only a goal that is paused can)"),
        (["cancel"], "cancel", "goal g1 is cancelled; it cannot be cancelled"),
    ],
)
async def test_an_illegal_request_is_answered_and_changes_nothing(
    redis: Redis, keys: RedisKeys, topics: Topics, setup: list[LifecycleAction], action: LifecycleAction, message: str
) -> None:
    deps = make_deps(redis, keys, topics)
    await logic.plan_goal(deps, GOAL)
    for earlier in setup:
        await logic.change_lifecycle(deps, asked(earlier))
    before = await state_of(deps)
    outputs = await logic.change_lifecycle(deps, asked(action))
    [rejected] = of(outputs, GoalLifecycleRejected)
    assert [o.topic for o in outputs] == [topics.progress]
    assert rejected.detail.startswith(message) and rejected.state == before and rejected.action == action
    assert await state_of(deps) == before


async def test_pausing_a_completed_goal_is_rejected(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    await logic.record_task_result(deps, completed(r1, "4"))
    [writer] = of(await logic.record_task_result(deps, completed(r2, "a store")), TaskAssigned)
    await logic.record_task_result(deps, completed(writer, "done"))
    [rejected] = of(await logic.change_lifecycle(deps, asked("pause")), GoalLifecycleRejected)
    assert rejected.detail == "goal g1 is completed; it cannot be paused (only a goal that is running can)"


async def test_a_request_for_an_unknown_goal_is_rejected(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = make_deps(redis, keys, topics)
    [rejected] = of(await logic.change_lifecycle(deps, asked("cancel", "g-none")), GoalLifecycleRejected)
    assert rejected.state is None and "unknown" in rejected.detail
