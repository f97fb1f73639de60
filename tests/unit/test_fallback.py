"""When the agent path fails: a goal type's fallback (a function or a fixed plan of tool calls),
escalation to a person and that person's answer, and the executor's allowlist for fallbacks."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.budget import BudgetLimits
from schemas.events import (
    GoalAnswered,
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalFallbackStarted,
    GoalLifecycleRejected,
    GoalPlanned,
    GoalReopened,
    GoalStateChanged,
    GoalSubmitted,
    TaskAssigned,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.topics import Topics
from services.orchestrator import fallback, logic
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError, DeadlineExceeded, GoalStopped, ToolDenied
from services.runtime.goal_types import GoalType, GoalTypes
from services.runtime.idempotency import SideEffectGuard
from services.runtime.offline_model import Turn
from services.tools import logic as tools_logic
from services.tools.fallbacks import arithmetic_answer
from services.tools.limits import ToolLimiter
from services.tools.registry import CallContext, calculator
from services.tools.settings import ToolsSettings
from tests.unit.test_orchestrator import completed, dead_lettered, make_deps, of

pytestmark = pytest.mark.unit

TWO_STEPS = GoalType.model_validate({
    "name": "noted-sum",
    "on_failure": "escalate",
    "fallback": {"name": "sum-and-note", "steps": [
        {"tool": "calculator", "arguments": {"expression": "6*7"}},
        {"tool": "save_note", "arguments": {"title": "sum", "body": "{previous} (asked: {goal_text})"}},
    ]},
})


def typed(goal_type: str | None, text: str = "What is 2+2 and what is Redis?") -> GoalSubmitted:
    return GoalSubmitted(tenant="acme", goal_id="g1", text=text, goal_type=goal_type)


def deps_with_types(redis: Redis, keys: RedisKeys, topics: Topics, script: Any = None) -> logic.OrchestratorDeps:
    packaged = GoalTypes.load()
    types = GoalTypes(packaged.types | {TWO_STEPS.name: TWO_STEPS})
    return dataclasses.replace(make_deps(redis, keys, topics, script), goal_types=types)


def reply(request: ToolCallRequested, output: str = "", ok: bool = True, error: str | None = None) -> ToolCallCompleted:
    return ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool=request.tool, ok=ok,
        output=output, error=error,
    )


async def state_of(deps: logic.OrchestratorDeps) -> logic.GoalState:
    stored = await deps.ledger.store.load(deps.keys.goal_state("acme", "g1"))
    assert stored is not None
    return stored


async def test_a_failed_task_runs_the_function_fallback_and_the_answer_names_it(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, typed("arithmetic")), TaskAssigned)
    outputs = await logic.record_task_result(deps, TaskFailed(**r1.caused(), kind="researcher", reason="max_steps", detail="no answer"))
    [started] = of(outputs, GoalFallbackStarted)
    assert (started.fallback, started.reason) == ("arithmetic_answer", "task_failed:max_steps")
    [call] = of(outputs, ToolCallRequested)
    assert (call.tool, call.agent_kind, call.reply_to) == ("arithmetic_answer", "fallback:arithmetic", topics.goals)
    assert call.arguments == {
        "goal_text": "What is 2+2 and what is Redis?", "failure": "task_failed:max_steps: task r1 (researcher) failed: no answer",
    }
    assert [o.topic for o in outputs if o.event is call] == [topics.tools]
    with pytest.raises(GoalStopped):  # the agents stop at their next model call
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)
    # A task that finishes late is kept, and starts nothing: the fallback answers now.
    assert await logic.record_task_result(deps, completed(r2, "Redis is a store")) == []

    result = reply(call, "2+2 = 4")
    [done] = of(await fallback.fallback_result(deps, result), GoalCompleted)
    assert (done.answer, done.path, done.fallback) == ("2+2 = 4", "fallback", "arithmetic_answer")
    assert done.task_results == {"r2": "Redis is a store", "fallback:1": "2+2 = 4"}
    assert (await state_of(deps)).status == "completed"
    [again] = of(await fallback.fallback_result(deps, result), GoalCompleted)  # redelivered: the same event
    assert again.event_id == done.event_id
    assert await fallback.fallback_result(deps, reply(call, "2+2 = 4")) == []  # a second reply: nothing new
    assert deps.llm.offline.calls == 1  # the plan: the fallback called no model


async def test_a_fixed_plan_runs_its_calls_in_order_each_seeing_the_one_before(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, *_] = of(await logic.plan_goal(deps, typed("noted-sum", "Sum it up")), TaskAssigned)
    [first] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r1, "runaway")), ToolCallRequested)
    assert (first.tool, first.arguments, first.agent_kind) == ("calculator", {"expression": "6*7"}, "fallback:noted-sum")
    [second] = of(await fallback.fallback_result(deps, reply(first, "6*7 = 42")), ToolCallRequested)
    assert second.tool == "save_note" and second.arguments == {"title": "sum", "body": "6*7 = 42 (asked: Sum it up)"}
    assert second.call_id != first.call_id
    assert await fallback.fallback_result(deps, reply(first, "6*7 = 42")) == []  # the first result again: nothing new
    [done] = of(await fallback.fallback_result(deps, reply(second, "saved note sum")), GoalCompleted)
    assert (done.answer, done.fallback) == ("saved note sum", "sum-and-note")


async def test_a_fallback_that_fails_escalates_when_the_type_says_so(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, _] = of(await logic.plan_goal(deps, typed("noted-sum")), TaskAssigned)
    [first] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r1, "runaway")), ToolCallRequested)
    [escalated] = of(await fallback.fallback_result(deps, reply(first, ok=False, error="division by zero")), GoalEscalated)
    assert escalated.reason == "fallback_failed"
    assert "sum-and-note call 0 (calculator) failed: division by zero" in escalated.detail
    assert (await state_of(deps)).status == "waiting_for_human"


async def test_a_fallback_without_escalation_that_fails_fails_the_goal(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, typed("arithmetic")), TaskAssigned)
    [call] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r1, "runaway")), ToolCallRequested)
    # The agent path's other work dead-lettered meanwhile changes nothing: the fallback runs.
    assert await logic.fail_on_dead_letter(deps, dead_lettered(r2, "budget_exceeded")) == []
    [failed] = of(await logic.fail_on_dead_letter(deps, dead_lettered(call, "tool_denied")), GoalFailed)
    assert failed.reason == "fallback_failed:tool_denied" and failed.detail.startswith("fallback arithmetic_answer: ")
    assert (await state_of(deps)).status == "failed"


async def test_without_a_fallback_the_goal_escalates_and_a_persons_answer_completes_it(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, typed("reviewed")), TaskAssigned)
    await logic.record_task_result(deps, completed(r1, "2+2 = 4"))
    outputs = await logic.record_task_result(deps, TaskFailed(**r2.caused(), kind="researcher", reason="invalid_output"))
    [escalated] = of(outputs, GoalEscalated)
    assert escalated.goal_text == "What is 2+2 and what is Redis?"
    assert escalated.task_results == {"r1": "2+2 = 4"}  # what the agents found, for the person
    assert escalated.reason == "task_failed:invalid_output"
    assert (await state_of(deps)).status == "waiting_for_human"
    assert await logic.fail_on_dead_letter(deps, dead_lettered(r2)) == []  # it waits for the person

    answer = GoalAnswered(tenant="acme", goal_id="g1", answer="4; Redis is an in-memory store", answered_by="ana")
    outputs = await fallback.answered(deps, answer)
    [changed] = of(outputs, GoalStateChanged)
    assert (changed.from_state, changed.to_state, changed.action, changed.requested_by) == (
        "waiting_for_human", "completed", "answer", "ana",
    )
    [done] = of(outputs, GoalCompleted)
    assert (done.answer, done.path, done.answered_by, done.fallback) == ("4; Redis is an in-memory store", "human", "ana", None)

    again = GoalAnswered(tenant="acme", goal_id="g1", answer="something else", answered_by="bo")
    [rejected] = of(await fallback.answered(deps, again), GoalLifecycleRejected)
    assert rejected.action == "answer" and rejected.state == "completed"
    assert "goal g1 is completed; it cannot be answered (only a goal that is waiting_for_human can)" == rejected.detail


async def test_a_running_goal_cannot_be_answered_and_an_escalated_one_can_be_cancelled(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, _] = of(await logic.plan_goal(deps, typed("reviewed")), TaskAssigned)
    early = GoalAnswered(tenant="acme", goal_id="g1", answer="too soon", answered_by="ana")
    [rejected] = of(await fallback.answered(deps, early), GoalLifecycleRejected)
    assert rejected.state == "running" and (await state_of(deps)).status == "running"
    await logic.record_task_result(deps, TaskFailed(**r1.caused(), kind="researcher", reason="max_steps"))
    from tests.unit.test_lifecycle import asked

    [changed] = of(await logic.change_lifecycle(deps, asked("cancel")), GoalStateChanged)
    assert (changed.from_state, changed.to_state) == ("waiting_for_human", "cancelled")


async def test_a_plan_that_cannot_be_made_runs_the_fallback(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    def no_plan(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(content="I would rather not")

    deps = deps_with_types(redis, keys, topics, no_plan)
    outputs = await logic.plan_goal(deps, typed("arithmetic"))
    [started] = of(outputs, GoalFallbackStarted)
    assert started.reason == "invalid_plan" and "no valid plan after 2 attempts" in started.detail
    assert [c.tool for c in of(outputs, ToolCallRequested)] == ["arithmetic_answer"]


async def test_a_budget_that_runs_out_while_planning_dead_letters_the_submission_then_runs_the_fallback(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    # Submitted a minute ago with 30 s to run: the deadline has passed before the planner's call.
    goal = typed("arithmetic").model_copy(
        update={"budget": BudgetLimits(deadline_s=30), "ts": datetime.now(UTC) - timedelta(seconds=60)}
    )
    with pytest.raises(DeadlineExceeded):  # the submission is dead-lettered ...
        await logic.plan_goal(deps, goal)
    assert (await state_of(deps)).status == "planning"  # ... and the goal was accepted first
    outputs = await logic.fail_on_dead_letter(deps, dead_lettered(goal, "deadline_exceeded"))
    [started] = of(outputs, GoalFallbackStarted)
    assert started.reason == "deadline_exceeded"
    assert [c.tool for c in of(outputs, ToolCallRequested)] == ["arithmetic_answer"]
    assert deps.llm.offline.calls == 0


async def test_an_unknown_goal_type_fails_the_goal_naming_the_known_ones(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [failed] = of(await logic.plan_goal(deps, typed("astrology")), GoalFailed)
    assert failed.reason == "unknown_goal_type"
    assert failed.detail.startswith("unknown goal type 'astrology'; known goal types: ['arithmetic', 'lookup'")
    assert deps.llm.offline.calls == 0


def test_a_goal_type_is_checked_when_loaded(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('name = "bad"\n[fallback]\nsteps = [{ tool = "rm_rf", arguments = {} }]\n')
    with pytest.raises(ConfigurationError, match=r"(?s)bad.toml.*fallback tool 'rm_rf' is unknown"):
        GoalTypes.load(tmp_path)
    (tmp_path / "bad.toml").write_text('name = "bad"\n[fallback]\nfunction = "arithmetic_answer"\nsteps = [{ tool = "calculator" }]\n')
    with pytest.raises(ConfigurationError, match="either `steps`"):
        GoalTypes.load(tmp_path)
    (tmp_path / "bad.toml").write_text('name = "bad"\n[fallback]\nsteps = [{ tool = "delegate", arguments = {} }]\n')
    with pytest.raises(ConfigurationError, match="handled by an agent"):
        GoalTypes.load(tmp_path)
    (tmp_path / "bad.toml").write_text('name = "bad"\n[fallback]\nsteps = [{ tool = "calculator", arguments = { expr = "1" } }]\n')
    with pytest.raises(ConfigurationError, match="invalid arguments for fallback tool calculator"):
        GoalTypes.load(tmp_path)


async def test_the_executor_allows_a_fallback_only_the_tools_its_plan_names(redis: Redis, keys: RedisKeys, tmp_path: Path) -> None:
    tools = {"calculator": calculator(), "arithmetic_answer": arithmetic_answer()}
    settings = ToolsSettings(timeout_s=2.0)
    deps = tools_logic.ToolsDeps(
        tools, {n: ToolLimiter(n, settings.limits_for(n)) for n in tools}, AgentCatalogue.load(),
        SideEffectGuard(redis, keys), "unit.audit", goal_types=GoalTypes.load(),
    )

    def asking(tool: str, arguments: dict[str, Any], actor: str) -> ToolCallRequested:
        return ToolCallRequested(
            tenant="acme", goal_id="g1", task_id="g1.fallback", call_id="g1.fallback:1:0", step_id="g1.fallback:1:0",
            tool=tool, arguments=arguments, agent_kind=actor, reply_to="unit.goals",
        )

    outputs = await tools_logic.execute(deps, asking("arithmetic_answer", {"goal_text": "What is 6*7?"}, "fallback:arithmetic"))
    [answer] = of(outputs, ToolCallCompleted)
    assert (answer.ok, answer.output) == (True, "6*7 = 42")
    with pytest.raises(ToolDenied, match="not allowed for agent kind 'fallback:arithmetic'"):
        await tools_logic.execute(deps, asking("calculator", {"expression": "1+1"}, "fallback:arithmetic"))
    with pytest.raises(ToolDenied, match="not allowed for agent kind 'researcher'"):  # agents may not call it
        await tools_logic.execute(deps, asking("arithmetic_answer", {"goal_text": "1+1"}, "researcher"))


async def test_arithmetic_answer_computes_every_expression_and_refuses_text_without_one() -> None:
    from schemas.tools import FallbackFunctionArgs
    from services.tools.registry import ToolUsageError

    run = arithmetic_answer().run
    context = CallContext("acme", "g1", "g1.fallback", "k")
    text = "What is 12*7, and (2+3)*4^2? Also 10/4."
    assert await run(FallbackFunctionArgs(goal_text=text), context) == "12*7 = 84\n(2+3)*4^2 = 80\n10/4 = 2.5"
    with pytest.raises(ToolUsageError, match="no arithmetic expression"):
        await run(FallbackFunctionArgs(goal_text="What is Apache Kafka?"), context)


async def test_agents_that_fail_while_the_goal_is_paused_start_its_fallback_only_at_the_resume(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    from tests.unit.test_lifecycle import asked

    deps = deps_with_types(redis, keys, topics)
    [r1, _] = of(await logic.plan_goal(deps, typed("arithmetic")), TaskAssigned)
    await logic.change_lifecycle(deps, asked("pause"))
    # The call in flight at the pause fails: nothing runs while the goal is paused.
    assert await logic.record_task_result(deps, TaskFailed(**r1.caused(), kind="researcher", reason="max_steps")) == []
    assert (await state_of(deps)).status == "paused"

    outputs = await logic.change_lifecycle(deps, asked("resume"))
    [changed] = of(outputs, GoalStateChanged)
    assert (changed.from_state, changed.to_state) == ("paused", "running")
    [started] = of(outputs, GoalFallbackStarted)
    assert started.reason == "task_failed:max_steps"
    assert [c.tool for c in of(outputs, ToolCallRequested)] == ["arithmetic_answer"]
    assert of(outputs, TaskAssigned) == []  # the agents' tasks stay stopped ...
    with pytest.raises(GoalStopped):  # ... and so does their budget
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)


async def test_a_fallback_paused_mid_way_keeps_the_result_that_came_in_and_answers_at_the_resume(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    from tests.unit.test_lifecycle import asked

    deps = deps_with_types(redis, keys, topics)
    [r1, *_] = of(await logic.plan_goal(deps, typed("noted-sum", "Sum it up")), TaskAssigned)
    [first] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r1, "runaway")), ToolCallRequested)
    await logic.change_lifecycle(deps, asked("pause"))
    assert await fallback.fallback_result(deps, reply(first, "6*7 = 42")) == []  # kept; nothing sent while paused
    outputs = await logic.change_lifecycle(deps, asked("resume"))
    [second] = of(outputs, ToolCallRequested)
    assert second.tool == "save_note" and "6*7 = 42" in second.arguments["body"]
    assert of(outputs, GoalFallbackStarted) == []  # it had started before the pause
    [done] = of(await fallback.fallback_result(deps, reply(second, "saved note sum")), GoalCompleted)
    assert (done.path, done.fallback, done.answer) == ("fallback", "sum-and-note", "saved note sum")


async def test_a_goal_whose_planning_was_dead_lettered_is_planned_again_by_a_redrive(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    goal = typed(None).model_copy(
        update={"budget": BudgetLimits(deadline_s=30), "ts": datetime.now(UTC) - timedelta(seconds=60)}
    )
    with pytest.raises(DeadlineExceeded):
        await logic.plan_goal(deps, goal)
    [failed] = of(await logic.fail_on_dead_letter(deps, dead_lettered(goal, "deadline_exceeded")), GoalFailed)
    assert failed.reason == "deadline_exceeded" and (await state_of(deps)).status == "failed"

    # The cause is fixed (here: the goal's budget, set again without the deadline); the redrive
    # reopens the goal, then republishes the submission.
    await redis.delete(keys.goal_budget("acme", "g1"))
    await deps.budget.open("acme", "g1", BudgetLimits(), datetime.now(UTC))
    reopened = GoalReopened(tenant="acme", goal_id="g1", reason="redrive", requested_by="ops")
    assert await logic.reopen(deps, reopened) == []
    assert (await state_of(deps)).status == "planning"
    outputs = await logic.plan_goal(deps, goal)
    assert of(outputs, GoalPlanned) and of(outputs, TaskAssigned)


async def test_a_redrive_leaves_a_goal_that_is_not_failed_stopped(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, _] = of(await logic.plan_goal(deps, typed("arithmetic")), TaskAssigned)
    [call] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r1, "runaway")), ToolCallRequested)
    await fallback.fallback_result(deps, reply(call, "2+2 = 4"))  # completed by its fallback
    await deps.budget.reopen("acme", "g1")  # what the redrive does before it reopens the goal
    reopened = GoalReopened(tenant="acme", goal_id="g1", reason="redrive", requested_by="ops")
    assert await logic.reopen(deps, reopened) == []
    with pytest.raises(GoalStopped):  # its parked agents stay parked
        await deps.budget.admit("acme", "g1", est_tokens=1, est_cost=0)


async def test_a_goal_refused_at_submission_is_not_reopened(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = deps_with_types(redis, keys, topics)
    await logic.plan_goal(deps, typed("astrology"))
    reopened = GoalReopened(tenant="acme", goal_id="g1", reason="redrive", requested_by="ops")
    assert await logic.reopen(deps, reopened) == []
    assert (await state_of(deps)).status == "failed"


async def test_after_a_redrive_a_late_result_of_the_first_fallback_is_not_taken_for_the_second(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = deps_with_types(redis, keys, topics)
    [r1, r2] = of(await logic.plan_goal(deps, typed("arithmetic")), TaskAssigned)
    [first] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r1, "runaway")), ToolCallRequested)
    of(await logic.fail_on_dead_letter(deps, dead_lettered(first, "tool_failed")), GoalFailed)
    reopened = GoalReopened(tenant="acme", goal_id="g1", reason="redrive", requested_by="ops")
    await logic.reopen(deps, reopened)
    [second] = of(await logic.fail_on_dead_letter(deps, dead_lettered(r2, "runaway")), ToolCallRequested)
    assert second.call_id != first.call_id
    assert await fallback.fallback_result(deps, reply(first, "stale")) == []
    [done] = of(await fallback.fallback_result(deps, reply(second, "2+2 = 4")), GoalCompleted)
    assert done.answer == "2+2 = 4"
