"""Delegation between agent kinds, driven event by event without a broker: the subtask's assignment,
its bounds, its result going back to the task that delegated it, and resume."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.budget import BudgetLimits
from schemas.events import (
    AuditRecorded,
    Delegation,
    LLMCallRecorded,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.topics import Topics
from services.agents import logic
from services.agents.delegation import DelegationPolicy
from services.runtime.catalogue import AgentCatalogue, AgentKind
from services.runtime.errors import BudgetExceeded, ConfigurationError
from services.runtime.offline_model import Script, ToolCall, Turn
from tests.unit.test_agent_step import answered, events_of, make_deps

WRITER = AgentKind(
    name="writer", description="Writes answers.", prompt="writer", tools=("save_note",), delegates_to=("researcher",),
)
RESEARCHER = AgentKind(
    name="researcher", description="Finds facts.", prompt="researcher", tools=("calculator",), delegates_to=("writer",),
)


def deps_for(redis: Redis, keys: RedisKeys, topics: Topics, kind: AgentKind, script: Script, **overrides: Any) -> logic.AgentDeps:
    options: dict[str, Any] = {"recall_k": 0, "delegation": DelegationPolicy(max_depth=2, max_fanout=3)}
    options.update(overrides)
    base = make_deps(redis, keys, topics, script=script, **options)
    return logic.AgentDeps(**{**base.__dict__, "kind": kind})


def task(kind: str = "writer", task_id: str = "g1.w1", depth: int = 0, chain: tuple[str, ...] = ()) -> TaskAssigned:
    delegated_by = None
    if chain:
        delegated_by = Delegation(task_id="g1.x", call_id="g1.x:0:0", step_id="g1.x:0", reply_to="unit.agent.x", chain=chain)
    return TaskAssigned(
        tenant="acme", goal_id="g1", task_id=task_id, kind=kind, instruction="What is 12*7",
        goal_text="What is 12*7", depth=depth, delegated_by=delegated_by,
    )


def delegate(kind: str = "researcher", instruction: str = "Compute 12*7") -> ToolCall:
    return ToolCall("delegate", {"kind": kind, "instruction": instruction})


def tool_messages(messages: list[dict[str, Any]]) -> list[str]:
    return [str(m["content"]) for m in messages if m["role"] == "tool"]


class Recorded:
    """A scripted model that plays `turns` in order and keeps the messages of every call."""

    def __init__(self, *turns: Turn) -> None:
        self.turns = list(turns)
        self.seen: list[list[dict[str, Any]]] = []
        self.offered: list[list[str]] = []

    def __call__(self, messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        self.seen.append(messages)
        self.offered.append(tools)
        return self.turns.pop(0) if len(self.turns) > 1 else self.turns[0]


def by_task(**models: Script) -> Script:
    """One scripted model for every kind in a test (the offline provider is one per process): each
    task's turns come from the model named by its instruction's first word."""

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        user = next(str(m["content"]) for m in messages if m["role"] == "user")
        return models[user.removeprefix("Task: ").split()[0].lower()](messages, tools)

    return script


async def test_an_allowed_delegation_assigns_the_subtask_to_the_other_kind(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    model = Recorded(Turn(tool_calls=[delegate()]))
    deps = deps_for(redis, keys, topics, WRITER, model)
    assigned = task()
    outputs = await logic.start_task(deps, assigned)
    [child] = events_of(outputs, TaskAssigned)
    assert [o.topic for o in outputs if o.event is child] == [topics.agent("researcher")]
    assert (child.task_id, child.kind, child.instruction, child.depth, child.goal_id) == (
        "g1.w1/researcher-1", "researcher", "Compute 12*7", 1, "g1",
    )
    assert child.delegated_by == Delegation(
        task_id="g1.w1", call_id="g1.w1:0:0", step_id="g1.w1:0", reply_to=topics.agent("writer"), chain=("writer",),
    )
    assert events_of(outputs, ToolCallRequested) == []  # handled by the agent, never sent to an executor
    assert "delegate" in model.offered[0] and "save_note" in model.offered[0]
    # Applying the same event again makes the same subtask, once.
    again = await logic.start_task(deps, assigned)
    assert [e.event_id for e in events_of(again, TaskAssigned)] == [child.event_id]


async def test_the_subtask_answers_the_delegating_task_which_resumes_with_its_result(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    parent_model = Recorded(Turn(tool_calls=[delegate()]), Turn(content="The answer is 84."))
    models = by_task(what=parent_model, compute=Recorded(Turn(content="12*7 = 84")))
    parent = deps_for(redis, keys, topics, WRITER, models)
    researcher = deps_for(redis, keys, topics, RESEARCHER, models)
    [child] = events_of(await logic.start_task(parent, task()), TaskAssigned)
    ended = await logic.start_task(researcher, child)
    [reply] = events_of(ended, ToolCallCompleted)
    [record] = events_of(ended, TaskCompleted)
    routes = {type(o.event): (o.topic, o.key) for o in ended if not isinstance(o.event, LLMCallRecorded)}
    assert routes == {
        ToolCallCompleted: (topics.agent("writer"), "g1.w1"),
        TaskCompleted: (topics.progress, "g1"),  # on the goal's record; the orchestrator does not know it
    }
    assert (reply.task_id, reply.call_id, reply.step_id, reply.tool, reply.ok, reply.output) == (
        "g1.w1", "g1.w1:0:0", "g1.w1:0", "delegate", True, "12*7 = 84",
    )
    assert record.task_id == child.task_id and record.result == "12*7 = 84"

    final = await logic.resume_with_tool_result(parent, reply)
    [done] = events_of(final, TaskCompleted)
    assert done.task_id == "g1.w1" and done.result == "The answer is 84."
    assert [o.topic for o in final if isinstance(o.event, TaskCompleted)] == [topics.goals]
    [shown] = tool_messages(parent_model.seen[1])
    assert '<untrusted source="tool:delegate">' in shown and "12*7 = 84" in shown


async def test_a_failed_subtask_is_an_error_result_for_the_delegating_task(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    researcher = deps_for(
        redis, keys, topics, RESEARCHER, Recorded(Turn(tool_calls=[ToolCall("calculator", {"expression": "1+1"})])),
        max_steps=1,
    )
    child = task("researcher", "g1.w1/researcher-1", depth=1, chain=("writer",))
    outputs = await logic.start_task(researcher, child)
    [request] = events_of(outputs, ToolCallRequested)
    ended = await logic.resume_with_tool_result(researcher, answered(request, "2"))
    [reply] = events_of(ended, ToolCallCompleted)
    [failed] = events_of(ended, TaskFailed)
    assert [o.topic for o in ended if o.event is failed] == [topics.progress]
    assert not reply.ok and reply.error == (
        "delegated task g1.w1/researcher-1 (researcher) failed: max_steps: no answer after 1 model calls"
    )


async def test_a_subtask_deeper_than_its_own_kinds_limit_is_refused_without_a_model_call(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    """The delegating agent had a looser limit than this kind's: the subtask answers with the refusal."""
    model = Recorded(Turn(content="never asked"))
    researcher = deps_for(redis, keys, topics, RESEARCHER, model, delegation=DelegationPolicy(max_depth=1))
    outputs = await logic.start_task(researcher, task("researcher", "g1.w1/researcher-1/writer-1/researcher-1", depth=3,
                                                      chain=("writer", "researcher", "writer")))
    [reply] = events_of(outputs, ToolCallCompleted)
    assert not reply.ok and reply.task_id == "g1.x" and reply.error == (
        "delegated task g1.w1/researcher-1/writer-1/researcher-1 (researcher) failed: delegation_depth: "
        "depth 3 is beyond this kind's limit 1"
    )
    assert researcher.llm.offline.calls == 0


async def test_delegate_is_refused_to_a_kind_without_delegates_to_and_for_a_kind_not_listed(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    plain = make_deps(redis, keys, topics, script=Recorded(Turn(tool_calls=[delegate("writer")]), Turn(content="ok")), recall_k=0)
    outputs = await logic.start_task(plain, task("researcher", "g1.r1"))
    assert events_of(outputs, TaskAssigned) == []
    [audit] = events_of(outputs, AuditRecorded)
    assert audit.detail["policy"] == "agent_allowlist" and "'delegate' is not allowed for agent kind 'researcher'" in audit.detail["error"]

    model = Recorded(Turn(tool_calls=[delegate("planner")]), Turn(content="ok"))
    deps = deps_for(redis, keys, topics, WRITER, model)
    outputs = await logic.start_task(deps, task(task_id="g1.w2"))
    assert events_of(outputs, TaskAssigned) == []
    [audit] = events_of(outputs, AuditRecorded)
    error = "agent kind 'writer' may not delegate to 'planner'; it may delegate to: ['researcher']"
    assert (audit.detail["policy"], audit.detail["error"]) == ("agent_allowlist", error)
    assert tool_messages(model.seen[1]) == [error]  # an invalid turn: the model is told, and asked again


async def test_a_delegation_beyond_the_depth_limit_is_refused_and_the_model_is_told_why(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    model = Recorded(Turn(tool_calls=[delegate("writer")]), Turn(content="did it myself"))
    deps = deps_for(redis, keys, topics, RESEARCHER, model, max_invalid_outputs=0)
    deep = task("researcher", "g1.r1/writer-1/researcher-1", depth=2, chain=("researcher", "writer"))
    outputs = await logic.start_task(deps, deep)
    reason = "delegation refused: depth limit 2 reached (researcher → writer → researcher)"
    assert events_of(outputs, TaskAssigned) == []
    [audit] = events_of(outputs, AuditRecorded)
    assert (audit.action, audit.actor, audit.detail["policy"], audit.detail["tool"], audit.detail["error"]) == (
        "tool.denied", "researcher", "delegation_depth", "delegate", reason,
    )
    assert [o.topic for o in outputs if o.event is audit] == [topics.audit]
    [shown] = tool_messages(model.seen[1])
    assert f"ERROR: {reason}" in shown
    # Not an invalid output: with no invalid turns allowed, the task still answers.
    [reply] = events_of(outputs, ToolCallCompleted)
    assert reply.ok and reply.output == "did it myself"


async def test_delegations_beyond_the_fan_out_limit_are_refused_while_the_others_run(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    model = Recorded(Turn(tool_calls=[delegate(instruction=f"part {n}") for n in range(3)]), Turn(content="all in"))
    models = by_task(what=model, part=Recorded(Turn(content="a part")))
    deps = deps_for(redis, keys, topics, WRITER, models, delegation=DelegationPolicy(max_depth=2, max_fanout=2))
    researcher = deps_for(redis, keys, topics, RESEARCHER, models)
    outputs = await logic.start_task(deps, task())
    children = events_of(outputs, TaskAssigned)
    assert [c.task_id for c in children] == ["g1.w1/researcher-1", "g1.w1/researcher-2"]
    [audit] = events_of(outputs, AuditRecorded)
    reason = "delegation refused: fan-out limit 2 reached (task g1.w1 has delegated 2 subtasks already)"
    assert (audit.detail["policy"], audit.detail["error"], audit.subject) == ("delegation_fanout", reason, "g1.w1:0:2")
    replies = [events_of(await logic.start_task(researcher, c), ToolCallCompleted)[0] for c in children]
    assert await logic.resume_with_tool_result(deps, replies[0]) == []  # still waiting for the other
    [done] = events_of(await logic.resume_with_tool_result(deps, replies[1]), TaskCompleted)
    assert done.result == "all in"
    shown = tool_messages(model.seen[1])
    assert len(shown) == 3 and "a part" in shown[0] and "a part" in shown[1] and f"ERROR: {reason}" in shown[2]


async def test_a_resumed_task_that_waits_for_a_parked_subtask_sends_it_again_marked_resume(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    models = by_task(what=Recorded(Turn(tool_calls=[delegate()]), Turn(content="84")), compute=Recorded(Turn(content="12*7 = 84")))
    parent = deps_for(redis, keys, topics, WRITER, models)
    researcher = deps_for(redis, keys, topics, RESEARCHER, models)
    [child] = events_of(await logic.start_task(parent, task()), TaskAssigned)
    await parent.budget.stop("acme", "g1", "paused")
    assert await logic.start_task(researcher, child) == []  # parked at its first model call
    await parent.budget.reopen("acme", "g1")

    resume = task().model_copy(update={"event_id": "resume-1", "resume": True})
    [again] = events_of(await logic.start_task(parent, resume), TaskAssigned)
    assert again.resume and again.task_id == child.task_id and again.delegated_by == child.delegated_by
    assert again.event_id != child.event_id and again.causation_id == "resume-1"
    # A redelivered resume sends the same event again, which the subtask applies once.
    [same] = events_of(await logic.start_task(parent, resume), TaskAssigned)
    assert same.event_id == again.event_id

    [reply] = events_of(await logic.start_task(researcher, again), ToolCallCompleted)
    [done] = events_of(await logic.resume_with_tool_result(parent, reply), TaskCompleted)
    assert done.result == "84"
    # Once the subtask has answered, a later resume has nothing to send again.
    later = task().model_copy(update={"event_id": "resume-2", "resume": True})
    assert events_of(await logic.start_task(parent, later), TaskAssigned) == []


async def test_the_model_calls_of_a_subtask_count_against_the_goals_budget(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    def counting(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{len(messages)}+1"})])

    models = by_task(what=Recorded(Turn(tool_calls=[delegate()])), compute=counting)
    parent = deps_for(redis, keys, topics, WRITER, models)
    researcher = deps_for(redis, keys, topics, RESEARCHER, models, max_steps=50)
    await parent.budget.open("acme", "g1", BudgetLimits(max_steps=4), datetime.now(UTC))
    [child] = events_of(await logic.start_task(parent, task()), TaskAssigned)
    outputs = await logic.start_task(researcher, child)
    with pytest.raises(BudgetExceeded) as caught:
        for n in range(10):
            [request] = events_of(outputs, ToolCallRequested)
            outputs = await logic.resume_with_tool_result(researcher, answered(request, str(n)))
    status = await parent.budget.status("acme", "g1")
    assert status is not None and status.spent["steps"] == 4  # the parent's call and three of the subtask's
    assert caught.value.figures["limit"] == 4


def test_the_catalogue_refuses_delegation_to_an_unknown_kind(tmp_path: Path) -> None:
    (tmp_path / "writer.toml").write_text(
        'name = "writer"\ndescription = "d"\nprompt = "writer"\ndelegates_to = ["researcher", "critic"]\n'
    )
    with pytest.raises(ConfigurationError, match=r"agent kind 'writer' delegates to unknown kinds \['critic', 'researcher'\]"):
        AgentCatalogue.load(tmp_path)
    (tmp_path / "writer.toml").write_text('name = "writer"\ndescription = "d"\nprompt = "writer"\ntools = ["delegate"]\n')
    with pytest.raises(ConfigurationError, match="name the kinds it may reach in delegates_to"):
        AgentCatalogue.load(tmp_path)


def test_the_packaged_writer_may_delegate_to_the_researcher() -> None:
    assert AgentCatalogue.load().get("writer").delegates_to == ("researcher",)
