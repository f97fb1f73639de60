"""Delegation between agent kinds on the real broker: a subtask's answer reaches the task that
delegated it and the goal's answer; a chain deeper than the limit is refused with its reason."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from schemas.budget import BudgetLimits
from schemas.events import (
    AuditRecorded,
    GoalCompleted,
    GoalFailed,
    GoalSubmitted,
    LLMCallRecorded,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
    WorkDeadLettered,
)
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings
from tests.integration.conftest import EVERY_SERVICE, KINDS, serving
from tests.support.kafka import RawProducer, TopicWatch
from services.runtime.offline_model import ToolCall, Turn, default_turn, role_of
from tests.support.scripts import delegating

AGENTS = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("agent", {"kind": "writer"})]


def mutual_kinds(directory: Path) -> Path:
    """The packaged kinds, each allowed to delegate to the other."""
    directory.mkdir()
    (directory / "researcher.toml").write_text(
        'name = "researcher"\ndescription = "Finds facts."\nprompt = "researcher"\n'
        'tools = ["calculator"]\ndelegates_to = ["writer"]\n'
    )
    (directory / "writer.toml").write_text(
        'name = "writer"\ndescription = "Writes answers."\nprompt = "writer"\n'
        'tools = ["save_note"]\ndelegates_to = ["researcher"]\n'
    )
    return directory


async def test_a_delegation_chain_deeper_than_the_limit_is_refused_with_a_clear_reason(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    monkeypatch.setenv("AGENT_DELEGATION_MAX_DEPTH", "2")
    platform = settings.platform.model_copy(update={"agents_dir": mutual_kinds(tmp_path / "kinds")})
    settings = dataclasses.replace(settings, platform=platform)
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id="g-deep", text="What is 12*7")

    async with AsyncExitStack() as stack:
        # Every agent hands its task to the other kind, until it is refused or answered.
        await stack.enter_async_context(serving(AGENTS, settings, delegating("researcher")))
        watch = await stack.enter_async_context(TopicWatch(settings.kafka, [*t.work_topics(), t.audit]))
        send = await stack.enter_async_context(RawProducer(settings.kafka))
        await send.event(t.goals, goal)
        done = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=90)
        seen = [s.event for s in await watch.caught_up() if s.event is not None and s.event.goal_id == goal.goal_id]

    reason = "delegation refused: depth limit 2 reached (researcher → writer → researcher)"
    deepest = "g-deep.t1/writer-1/researcher-1"
    # The refusal is on the audit trail with its policy and reason ...
    [audit] = [e for e in seen if isinstance(e, AuditRecorded)]
    assert (audit.action, audit.actor, audit.task_id, audit.detail["policy"], audit.detail["error"]) == (
        "tool.denied", "researcher", deepest, "delegation_depth", reason,
    )
    # ... and the model of the deepest task was shown it as its call's result.
    calls = [e for e in seen if isinstance(e, LLMCallRecorded) and e.task_id == deepest]
    assert len(calls) == 2 and f"ERROR: {reason}" in str(calls[1].messages[-1]["content"])
    # Exactly `limit` subtasks were started, one per level.
    delegated = [e for e in seen if isinstance(e, TaskAssigned) and e.delegated_by is not None]
    assert [(e.task_id, e.kind, e.depth) for e in delegated] == [
        ("g-deep.t1/writer-1", "writer", 1), (deepest, "researcher", 2),
    ]
    assert [e.delegated_by.chain for e in delegated if e.delegated_by] == [("researcher",), ("researcher", "writer")]
    # Each subtask's end is on the goal's record; none failed, and the goal ends with the model's answer.
    ended = {e.task_id: e.result for e in seen if isinstance(e, TaskCompleted)}
    assert ended == {
        deepest: f"stopped: {reason}",
        "g-deep.t1/writer-1": f"researcher found: stopped: {reason}",
        "g-deep.t1": f"writer found: researcher found: stopped: {reason}",
    }
    assert not [e for e in seen if isinstance(e, TaskFailed)]
    assert done.answer == f"writer found: researcher found: stopped: {reason}"
    assert done.task_results == {"t1": done.answer}


async def test_a_delegated_subtask_uses_its_own_tools_and_its_answer_reaches_the_goal(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id="g-delegated", text="What is 12*7")

    async with AsyncExitStack() as stack:
        # The packaged writer may delegate to the researcher, which works as the default model does.
        await stack.enter_async_context(serving(EVERY_SERVICE, settings, delegating("writer", delegators=("writer",))))
        watch = await stack.enter_async_context(TopicWatch(settings.kafka, t.work_topics()))
        send = await stack.enter_async_context(RawProducer(settings.kafka))
        await send.event(t.goals, goal)
        done = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=90)
        seen = await watch.caught_up()

    child_id = "g-delegated.t1/researcher-1"
    [child] = [s.event for s in seen if isinstance(s.event, TaskAssigned) and s.event.task_id == child_id]
    assert child.kind == "researcher" and child.depth == 1 and child.instruction == "What is 12*7"
    assert child.delegated_by is not None and child.delegated_by.task_id == "g-delegated.t1"
    # The subtask called the calculator itself, under its own task id.
    [calc] = [s.event for s in seen if isinstance(s.event, ToolCallRequested) and s.event.tool == "calculator"]
    assert calc.task_id == child_id and calc.agent_kind == "researcher"
    # Its result went back to the writer as the result of its delegate call, on the writer's inbox.
    [finished] = [s for s in seen if isinstance(s.event, TaskCompleted) and s.event.task_id == child_id]
    assert finished.topic == t.progress and "12*7 = 84" in finished.event.result
    [reply] = [s for s in seen if isinstance(s.event, ToolCallCompleted) and s.event.tool == "delegate"]
    assert reply.topic == t.agent("writer") and reply.event.task_id == "g-delegated.t1"
    assert reply.event.ok and reply.event.output == finished.event.result
    first_line = finished.event.result.splitlines()[0]
    assert done.answer == f"researcher found: {first_line}" and "84" in done.answer


async def test_the_model_calls_of_a_delegated_subtask_count_against_the_goals_budget(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    monkeypatch.setenv("AGENT_MAX_STEPS", "50")  # only the goal's budget stops the subtask
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id="g-spent", text="count on", budget=BudgetLimits(max_steps=6))
    counted = 0

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        nonlocal counted
        if role_of(messages) == "planner":
            return Turn(content='{"tasks": [{"id": "w1", "kind": "writer", "instruction": "count on"}]}')
        if role_of(messages) != "agent":
            return default_turn(messages, tools)
        if "delegate" in tools:  # the writer hands the counting to a researcher
            return Turn(tool_calls=[ToolCall("delegate", {"kind": "researcher", "instruction": "count on"})])
        counted += 1  # a new expression every time: nothing a loop detector could call a repeat
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{counted} + 1"})])

    services = [*AGENTS, ServiceSpec("tools")]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(serving(services, settings, script))
        watch = await stack.enter_async_context(TopicWatch(settings.kafka, t.work_topics()))
        send = await stack.enter_async_context(RawProducer(settings.kafka))
        await send.event(t.goals, goal)
        failed = await watch.event(GoalFailed, goal_id=goal.goal_id, timeout=90)
        seen = [s.event for s in await watch.caught_up() if s.event is not None and s.event.goal_id == goal.goal_id]

    child_id = "g-spent.w1/researcher-1"
    [dead] = [e for e in seen if isinstance(e, WorkDeadLettered)]
    assert dead.reason == "budget_exceeded" and dead.task_id == child_id  # the subtask ran out of the goal's steps
    assert failed.reason == "budget_exceeded" and failed.figures["limit"] == 6
    calls = [e for e in seen if isinstance(e, LLMCallRecorded)]
    # The plan and the writer's call, then the subtask's until the goal's six were spent.
    assert [(c.agent, c.task_id) for c in calls] == [("orchestrator", None), ("writer", "g-spent.w1")] + [
        ("researcher", child_id)
    ] * 4
