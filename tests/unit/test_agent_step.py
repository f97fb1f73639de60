"""The agent's step loop, driven event by event without a broker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.state import VersionedStore
from schemas.budget import BudgetLimits
from schemas.events import (
    AuditRecorded,
    LLMCallRecorded,
    MemoryHit,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.topics import Topics
from services.agents import logic
from services.agents.runaway import RunawayLimits
from services.runtime.budget import BudgetLedger
from services.runtime.catalogue import PACKAGED_PROMPTS, AgentCatalogue
from services.runtime.errors import BudgetExceeded, RunawayLoop
from services.runtime.idempotency import StepLedger
from services.runtime.llm import LLMGateway
from services.runtime.offline_model import Script, ToolCall, Turn
from services.runtime.prompts import PromptLibrary
from services.runtime.settings import BudgetSettings, LLMSettings


def make_deps(redis: Redis, keys: RedisKeys, topics: Topics, script: Script | None = None, **overrides: Any) -> logic.AgentDeps:
    kind = AgentCatalogue.load().get("researcher")
    options: dict[str, Any] = {
        "max_steps": 4, "max_invalid_outputs": 1, "recall_k": 3, "tool_output_chars": 2000, "context_tokens": 3000,
        "runaway": RunawayLimits(),
        "budget": BudgetLedger(redis, keys, BudgetSettings()),
    }
    options.update(overrides)
    return logic.AgentDeps(
        kind=kind,
        model="offline/default",
        prompts=PromptLibrary(PACKAGED_PROMPTS),
        llm=LLMGateway(LLMSettings(), {"offline/default"}, "test:1", script=script, budget=options["budget"]),
        ledger=StepLedger(VersionedStore(redis, logic.TaskCheckpoint, 3600)),
        keys=keys,
        topics=topics,
        **options,
    )


def assignment(instruction: str = "What is 12*7") -> TaskAssigned:
    return TaskAssigned(
        tenant="acme", goal_id="g1", task_id="g1.r1", kind="researcher",
        instruction=instruction, goal_text=instruction,
    )


def recalled(cause: MemoryRecallRequested) -> MemoryRecallCompleted:
    return MemoryRecallCompleted(**cause.caused(), request_id=cause.request_id, hits=[])


def answered(request: ToolCallRequested, output: str) -> ToolCallCompleted:
    return ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool=request.tool, ok=True, output=output
    )


def events_of(outputs: list[Any], kind: type) -> list[Any]:
    return [o.event for o in outputs if isinstance(o.event, kind)]


async def test_a_task_recalls_memory_then_calls_tools_then_answers(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = make_deps(redis, keys, topics)
    first = await logic.start_task(deps, assignment())
    [recall] = events_of(first, MemoryRecallRequested)
    assert first[0].topic == topics.memory and recall.reply_to == topics.agent("researcher")

    second = await logic.resume_with_memories(deps, recalled(recall))
    requests = events_of(second, ToolCallRequested)
    assert {r.tool for r in requests} == {"calculator", "kb_search"}
    routes = {o.event.tool: o.topic for o in second if isinstance(o.event, ToolCallRequested)}
    assert routes == {"calculator": topics.tools, "kb_search": topics.memory}

    calc = next(r for r in requests if r.tool == "calculator")
    kb = next(r for r in requests if r.tool == "kb_search")
    assert await logic.resume_with_tool_result(deps, answered(calc, "12*7 = 84")) == []  # still waiting for kb
    final = await logic.resume_with_tool_result(deps, answered(kb, "Multiplication is repeated addition."))
    [done] = events_of(final, TaskCompleted)
    assert "84" in done.result and done.steps == 2
    assert [o.topic for o in final if isinstance(o.event, TaskCompleted)] == [topics.goals]


async def test_a_redelivered_event_reproduces_its_outputs_without_calling_the_model(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [out] = await logic.start_task(deps, assignment())
    event = recalled(out.event)
    first = await logic.resume_with_memories(deps, event)
    calls_before = deps.llm.offline.calls
    again = await logic.resume_with_memories(deps, event)
    assert deps.llm.offline.calls == calls_before
    assert [o.event.event_id for o in again] == [o.event.event_id for o in first]


async def test_a_tool_outside_the_allowlist_is_refused_and_the_model_is_told(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    seen: list[list[dict[str, Any]]] = []

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        seen.append(messages)
        if len(seen) == 1:
            return Turn(tool_calls=[ToolCall("save_note", {"title": "x", "body": "y"})])
        return Turn(content="done without notes")

    deps = make_deps(redis, keys, topics, script=script, recall_k=0)
    outputs = await logic.start_task(deps, assignment())
    assert events_of(outputs, ToolCallRequested) == []
    [done] = events_of(outputs, TaskCompleted)
    assert done.result == "done without notes"
    tool_feedback = [m for m in seen[1] if m["role"] == "tool"]
    assert "not allowed for agent kind 'researcher'" in tool_feedback[0]["content"]
    [audit] = events_of(outputs, AuditRecorded)
    assert (audit.action, audit.actor, audit.detail["policy"], audit.detail["tool"]) == (
        "tool.denied", "researcher", "agent_allowlist", "save_note"
    )
    assert [o.topic for o in outputs if isinstance(o.event, AuditRecorded)] == [topics.audit]


async def test_invalid_arguments_are_a_bounded_retry_then_the_task_fails(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(tool_calls=[ToolCall("calculator", {"expression": "", "extra": 1})])

    deps = make_deps(redis, keys, topics, script=script, recall_k=0, max_invalid_outputs=1)
    outputs = await logic.start_task(deps, assignment())
    [failed] = events_of(outputs, TaskFailed)
    assert failed.reason == "invalid_output" and "invalid arguments for calculator" in failed.detail
    assert deps.llm.offline.calls == 2


async def test_a_model_that_never_answers_is_stopped_at_max_steps(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{len(messages)}+1"})])

    deps = make_deps(redis, keys, topics, script=script, recall_k=0, max_steps=3)
    outputs = await logic.start_task(deps, assignment())
    for _ in range(5):
        requests = events_of(outputs, ToolCallRequested)
        if not requests:
            break
        outputs = await logic.resume_with_tool_result(deps, answered(requests[0], "1"))
    [failed] = events_of(outputs, TaskFailed)
    assert failed.reason == "max_steps"
    assert deps.llm.offline.calls == 3


@pytest.mark.parametrize("tool", ["calculator", "kb_search"])
async def test_a_stale_tool_result_is_ignored(redis: Redis, keys: RedisKeys, topics: Topics, tool: str) -> None:
    deps = make_deps(redis, keys, topics, recall_k=0)
    outputs = await logic.start_task(deps, assignment())
    request = next(r for r in events_of(outputs, ToolCallRequested) if r.tool == tool)
    stale = ToolCallCompleted(**request.caused(), call_id="g1.r1:9:0", step_id="g1.r1:9", tool=tool, ok=True, output="x")
    assert await logic.resume_with_tool_result(deps, stale) == []


async def test_a_model_repeating_the_same_call_is_stopped_as_runaway_with_its_call_records(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(tool_calls=[ToolCall("calculator", {"expression": "1+1"})])

    deps = make_deps(redis, keys, topics, script=script, recall_k=0, max_steps=10)
    outputs = await logic.start_task(deps, assignment())
    with pytest.raises(RunawayLoop) as caught:
        for n in range(5):
            [request] = events_of(outputs, ToolCallRequested)
            outputs = await logic.resume_with_tool_result(deps, answered(request, f"1+1 = 2 (run {n})"))
    assert caught.value.reason == "runaway_loop" and caught.value.pattern == "repeated_call"
    # The third identical request never went out, but the model call that asked for it is recorded.
    assert deps.llm.offline.calls == 3
    assert [type(o.event) for o in caught.value.outputs] == [LLMCallRecorded]


async def test_a_goal_over_its_token_budget_stops_before_the_next_model_call(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{len(messages)}*3"})])

    deps = make_deps(redis, keys, topics, script=script, recall_k=0, max_steps=50)
    await deps.budget.open("acme", "g1", BudgetLimits(max_tokens=600), datetime.now(UTC))
    outputs = await logic.start_task(deps, assignment())
    records = events_of(outputs, LLMCallRecorded)
    with pytest.raises(BudgetExceeded) as caught:
        for n in range(50):
            [request] = events_of(outputs, ToolCallRequested)
            outputs = await logic.resume_with_tool_result(deps, answered(request, str(n)))
            records += events_of(outputs, LLMCallRecorded)
    status = await deps.budget.status("acme", "g1")
    assert status is not None
    spent = sum(r.input_tokens + r.output_tokens for r in records)
    assert spent == status.spent["tokens"] == caught.value.figures["spent"] and caught.value.figures["limit"] == 600
    last = records[-1].input_tokens + records[-1].output_tokens
    assert spent - last < 600 <= spent  # it stopped after the call that crossed the limit: one call over at most
    assert deps.llm.offline.calls == status.spent["steps"]  # no call was made past the check


async def test_a_task_of_a_stopped_goal_parks_and_resumes_from_its_checkpoint(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = make_deps(redis, keys, topics)
    [out] = await logic.start_task(deps, assignment())
    await deps.budget.stop("acme", "g1", "task r2 failed")
    assert await logic.resume_with_memories(deps, recalled(out.event)) == []  # no model call, nothing sent
    assert deps.llm.offline.calls == 0
    await deps.budget.reopen("acme", "g1")
    resumed = await logic.start_task(deps, assignment().model_copy(update={"event_id": "again", "resume": True}))
    assert {r.tool for r in events_of(resumed, ToolCallRequested)} == {"calculator", "kb_search"}
    assert deps.llm.offline.calls == 1
    # A plain re-assignment of a task that is running is ignored.
    assert await logic.start_task(deps, assignment().model_copy(update={"event_id": "third", "resume": True})) == []


async def test_a_task_that_finished_while_its_goal_was_failed_sends_its_result_again_on_resume(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(content="84")

    deps = make_deps(redis, keys, topics, script=script, recall_k=0)
    [done] = events_of(await logic.start_task(deps, assignment()), TaskCompleted)
    again = await logic.start_task(deps, assignment().model_copy(update={"event_id": "reopened", "resume": True}))
    assert events_of(again, TaskCompleted) == [done]  # the same event: the orchestrator applies it once
    assert deps.llm.offline.calls == 1


async def test_every_step_of_a_long_task_is_sent_within_the_context_budget(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    turns = 0

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        nonlocal turns
        turns += 1
        if turns > 6:
            return Turn(content="Lyon has about 520,000 inhabitants.")
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{turns}*7"})])

    budget = 600
    deps = make_deps(redis, keys, topics, script=script, max_steps=10, context_tokens=budget)
    [out] = await logic.start_task(deps, assignment("Find the population of Lyon"))
    lesson = MemoryHit(memory_id="f1", kind="lesson", text="Searched the census page by page.", score=0.9,
                       label="FAILED (budget_exceeded): do not repeat")
    fact = MemoryHit(memory_id="m1", kind="fact", text="Lyon is in France.", score=0.8)
    outputs = await logic.resume_with_memories(
        deps, MemoryRecallCompleted(**out.event.caused(), request_id=out.event.request_id, hits=[lesson, fact])
    )
    records = events_of(outputs, LLMCallRecorded)
    for n in range(10):
        requests = events_of(outputs, ToolCallRequested)
        if not requests:
            break
        outputs = await logic.resume_with_tool_result(deps, answered(requests[0], f"{n}: " + "digits " * 100))
        records += events_of(outputs, LLMCallRecorded)

    [done] = events_of(outputs, TaskCompleted)
    assert done.steps == 7 and len(records) == 7
    for record in records:
        assert record.context_tokens is not None and record.full_history_tokens is not None
        assert record.context_tokens <= budget  # the context stays within its token budget
        assert record.full_history_tokens >= record.context_tokens
        assert record.messages[1]["content"].startswith("Task: Find the population of Lyon")
    assert records[-1].full_history_tokens > 2 * budget  # the naive history would have been far over
    first_context = str(records[0].messages[1]["content"])
    assert "- FAILED (budget_exceeded): do not repeat — Searched the census page by page." in first_context
    summary = str(records[-1].messages[2]["content"])
    assert "- step 5: calculator(expression=\"5*7\") -> 4: digits digits" in summary
