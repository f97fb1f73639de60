"""Orchestrator decisions without a broker: plan, dispatch in dependency order, answer."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.state import VersionedStore
from schemas.budget import BudgetLimits
from schemas.events import (
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    GoalReopened,
    GoalSubmitted,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    WorkDeadLettered,
)
from schemas.topics import Topics
from services.orchestrator import logic
from services.runtime.budget import BudgetLedger
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import GoalStopped
from services.runtime.idempotency import StepLedger
from services.runtime.llm import LLMGateway
from services.runtime.offline_model import Script, Turn
from services.runtime.prompts import ORCHESTRATOR_PROMPTS, PromptLibrary
from services.runtime.settings import BudgetSettings, LLMSettings


def make_deps(redis: Redis, keys: RedisKeys, topics: Topics, script: Script | None = None) -> logic.OrchestratorDeps:
    budget = BudgetLedger(redis, keys, BudgetSettings())
    return logic.OrchestratorDeps(
        llm=LLMGateway(LLMSettings(), {"offline/default"}, "test:1", script=script, budget=budget),
        ledger=StepLedger(VersionedStore(redis, logic.GoalState, 3600)),
        keys=keys, topics=topics, catalogue=AgentCatalogue.load(),
        prompts=PromptLibrary(ORCHESTRATOR_PROMPTS),
        model="offline/default", max_plan_attempts=2, budget=budget,
    )


GOAL = GoalSubmitted(tenant="acme", goal_id="g1", text="What is 2+2 and what is Redis?")


def of(outputs: list[Any], kind: type) -> list[Any]:
    return [o.event for o in outputs if isinstance(o.event, kind)]


def completed(task: TaskAssigned, result: str) -> TaskCompleted:
    return TaskCompleted(**task.caused(), kind=task.kind, result=result, steps=1)


async def test_a_goal_is_planned_dispatched_in_dependency_order_and_answered(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    outputs = await logic.plan_goal(deps, GOAL)
    [planned] = of(outputs, GoalPlanned)
    assert [t.kind for t in planned.plan.tasks] == ["researcher", "researcher", "writer"]
    first_wave = of(outputs, TaskAssigned)
    assert [t.task_id for t in first_wave] == ["g1.r1", "g1.r2"]
    assert {o.topic for o in outputs if isinstance(o.event, TaskAssigned)} == {topics.agent("researcher")}

    assert of(await logic.record_task_result(deps, completed(first_wave[0], "2+2 = 4")), TaskAssigned) == []
    [writer] = of(await logic.record_task_result(deps, completed(first_wave[1], "Redis is a store")), TaskAssigned)
    assert writer.kind == "writer" and writer.inputs == {"r1": "2+2 = 4", "r2": "Redis is a store"}

    final = await logic.record_task_result(deps, completed(writer, "4; Redis is a store"))
    [done] = of(final, GoalCompleted)
    assert done.answer == "4; Redis is a store"
    assert done.task_results == {"r1": "2+2 = 4", "r2": "Redis is a store", "w1": "4; Redis is a store"}


async def test_a_redelivered_submission_does_not_plan_twice(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = make_deps(redis, keys, topics)
    first = await logic.plan_goal(deps, GOAL)
    again = await logic.plan_goal(deps, GOAL)
    assert deps.llm.offline.calls == 1
    assert [o.event.event_id for o in again] == [o.event.event_id for o in first]


async def test_an_invalid_plan_is_retried_with_the_error_then_the_goal_fails(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    seen: list[list[dict[str, Any]]] = []

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        seen.append(messages)
        return Turn(content='{"tasks": [{"id": "a", "kind": "astrologer", "instruction": "x"}]}')

    deps = make_deps(redis, keys, topics, script)
    [failed] = of(await logic.plan_goal(deps, GOAL), GoalFailed)
    assert failed.reason == "invalid_plan" and "astrologer" in failed.detail
    assert len(seen) == 2
    assert "That plan is invalid" in seen[1][-1]["content"]


async def test_a_failed_task_fails_the_goal_once(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    [failed] = of(await logic.record_task_result(deps, TaskFailed(**r1.caused(), kind="researcher", reason="max_steps")), GoalFailed)
    assert failed.reason == "task_failed:max_steps"
    assert await logic.record_task_result(deps, completed(r2, "late")) == []
    with pytest.raises(GoalStopped):  # the other task stops at its next model call
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)


def dead_lettered(cause: Any, reason: str = "tool_failed", **figures: float) -> WorkDeadLettered:
    return WorkDeadLettered(
        **cause.caused(), reason=reason, detail="OSError: disk full", dead_event_type=cause.event_type,
        dead_event_id=cause.event_id, dlq_topic="unit.tools.dlq", original_topic="unit.tools",
        original_partition=0, original_offset=7, consumer_group="unit.tools", figures=figures,
    )


async def test_dead_lettered_work_fails_the_goal_with_its_reason_and_figures_and_stops_its_tasks(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    outputs = await logic.fail_on_dead_letter(deps, dead_lettered(r1, "budget_exceeded", limit=500, spent=512))
    [failed] = of(outputs, GoalFailed)
    assert failed.reason == "budget_exceeded" and failed.figures == {"limit": 500, "spent": 512}
    assert "unit.tools.dlq" in failed.detail and [o.topic for o in outputs] == [topics.progress]
    with pytest.raises(GoalStopped):
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)
    assert await logic.fail_on_dead_letter(deps, dead_lettered(r2)) == []  # it failed once
    assert await logic.record_task_result(deps, completed(r2, "late")) == []


async def test_a_reopened_goal_resends_its_unfinished_tasks_to_resume_and_completes(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    await logic.record_task_result(deps, completed(r1, "2+2 = 4"))
    await logic.fail_on_dead_letter(deps, dead_lettered(r2))
    resent = of(await logic.reopen(deps, GoalReopened(tenant="acme", goal_id="g1", reason="redrive", requested_by="ops")), TaskAssigned)
    assert [(t.task_id, t.resume) for t in resent] == [("g1.r2", True)]
    await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)  # no longer stopped
    [writer] = of(await logic.record_task_result(deps, completed(r2, "Redis is a store")), TaskAssigned)
    [done] = of(await logic.record_task_result(deps, completed(writer, "4; Redis")), GoalCompleted)
    assert done.answer == "4; Redis"


async def test_a_goal_asking_for_more_budget_than_its_tenant_may_fails_without_a_model_call(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    greedy = GOAL.model_copy(update={"budget": BudgetLimits(max_cost_usd=1_000)})
    [failed] = of(await logic.plan_goal(deps, greedy), GoalFailed)
    assert failed.reason == "budget_policy" and "max_cost_usd=1000.0 (at most 5.0)" in failed.detail
    assert deps.llm.offline.calls == 0


async def test_the_plan_records_the_limits_the_goal_runs_under(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = make_deps(redis, keys, topics)
    [planned] = of(await logic.plan_goal(deps, GOAL.model_copy(update={"budget": BudgetLimits(max_tokens=9_000)})), GoalPlanned)
    assert planned.budget.max_tokens == 9_000 and planned.budget.max_cost_usd == 5.0
    status = await deps.budget.status("acme", "g1")
    assert status is not None and status.limits == planned.budget and status.spent["steps"] == 1


async def test_a_goal_with_a_task_that_failed_outright_is_not_reopened_and_stays_stopped(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, GOAL), TaskAssigned)
    await logic.record_task_result(deps, TaskFailed(**r1.caused(), kind="researcher", reason="max_steps"))
    await deps.budget.reopen("acme", "g1")  # what a redrive does before the orchestrator decides
    reopened = GoalReopened(tenant="acme", goal_id="g1", reason="redrive", requested_by="ops")
    assert await logic.reopen(deps, reopened) == []
    with pytest.raises(GoalStopped, match="task r1 failed"):
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)
