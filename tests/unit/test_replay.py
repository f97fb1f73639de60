"""Replay from a goal's record: the recorded answers to model calls, tool calls and recalls, the
divergence error, and the comparison of two runs' events in causal order."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from schemas.envelope import Envelope, utcnow
from schemas.events import (
    GoalCompleted,
    GoalPlanned,
    GoalSubmitted,
    LLMCallRecorded,
    MemoryHit,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.plan import Plan
from services.ops.replay import GoalRecord, causal_order, compare
from services.runtime.errors import Permanent
from services.runtime.llm import LLMGateway
from services.runtime.prompts import Prompt
from services.runtime.settings import LLMSettings

GOAL = "g-1"
TASK = "g-1.r1"
START = utcnow()


def at(seconds: float) -> dict[str, Any]:
    return {"tenant": "acme", "goal_id": GOAL, "ts": START + timedelta(seconds=seconds)}


def call(purpose: str, agent: str, content: str | None, seconds: float, step_id: str | None = None,
         tool_calls: list[dict[str, Any]] | None = None) -> LLMCallRecorded:
    response: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        response["tool_calls"] = tool_calls
    return LLMCallRecorded(
        **at(seconds), task_id=TASK if step_id else None, purpose=purpose, agent=agent, model="offline/default",
        prompt_version=f"{agent}.v1", prompt_hash="h", messages=[{"role": "user", "content": "q"}],
        response=response, input_tokens=11, output_tokens=7, cost_usd=0.25, latency_ms=3.0, step_id=step_id,
        instance="host:1",
    )


CALC = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}


def recorded_goal() -> list[Envelope]:
    """A goal with one researcher task that calls the calculator once, as the recorder keeps it."""
    request = ToolCallRequested(
        **at(4), task_id=TASK, call_id=f"{TASK}:0:0", step_id=f"{TASK}:0", tool="calculator",
        arguments={"expression": "12*7"}, agent_kind="researcher", reply_to="sb.agent.researcher",
    )
    return [
        GoalSubmitted(**at(0), text="What is 12*7?"),
        call("plan", "orchestrator", '{"tasks": []}', 1),
        GoalPlanned(**at(1.1), plan=Plan.model_validate({"tasks": [{"id": "r1", "kind": "researcher", "instruction": "12*7"}]}),
                    model="offline/default", prompt_version="planner.v1"),
        TaskAssigned(**at(2), task_id=TASK, kind="researcher", instruction="12*7", goal_text="What is 12*7?"),
        MemoryRecallRequested(**at(2.1), task_id=TASK, request_id=f"{TASK}:recall", query="12*7", reply_to="x"),
        MemoryRecallCompleted(**at(2.2), task_id=TASK, request_id=f"{TASK}:recall",
                              hits=[MemoryHit(memory_id="m1", kind="fact", text="twelve", score=0.9)]),
        call("step", "researcher", None, 3, f"{TASK}:0", [CALC]),
        request,
        ToolCallCompleted(**request.caused(), ts=START + timedelta(seconds=5), call_id=request.call_id,
                          step_id=request.step_id, tool="calculator", ok=True, output="12*7 = 84"),
        call("step", "researcher", "84", 6, f"{TASK}:1"),
        TaskCompleted(**at(7), task_id=TASK, kind="researcher", result="84", steps=2),
        call("answer", "orchestrator", "It is 84.", 8),
        GoalCompleted(**at(9), answer="It is 84."),
    ]


def test_a_model_call_gets_the_recorded_response_of_its_step_or_of_the_goal() -> None:
    record = GoalRecord(recorded_goal())

    step = record.model_response("step", "researcher", GOAL, f"{TASK}:1", [{"role": "user", "content": "q"}])
    plan = record.model_response("plan", "orchestrator", GOAL, None, [{"role": "user", "content": "q"}])

    assert step.response["content"] == "84" and plan.response["content"] == '{"tasks": []}'
    assert record.answered["model"] == 2 and record.changed_inputs == []
    record.model_response("answer", "orchestrator", GOAL, None, [{"role": "user", "content": "other"}])
    assert record.changed_inputs == [f"answer orchestrator {GOAL}"]  # answered, and noted


def test_a_call_the_record_does_not_hold_is_a_divergence() -> None:
    record = GoalRecord(recorded_goal())
    record.model_response("plan", "orchestrator", GOAL, None, [])

    with pytest.raises(Permanent, match=rf"replay diverged at model call step researcher {TASK}:2"):
        record.model_response("step", "researcher", GOAL, f"{TASK}:2", [])
    with pytest.raises(Permanent, match=f"replay diverged at model call plan orchestrator {GOAL}"):
        record.model_response("plan", "orchestrator", GOAL, None, [])  # the record planned once
    assert record.diverged == [f"model call step researcher {TASK}:2", f"model call plan orchestrator {GOAL}"]
    with pytest.raises(Permanent) as raised:
        record.model_response("step", "researcher", GOAL, f"{TASK}:2", [])
    assert raised.value.reason == "replay_diverged"  # its own dead-letter reason, not a tool failure


async def test_the_gateway_answers_from_the_record_with_its_content_tool_calls_tokens_and_cost() -> None:
    record = GoalRecord(recorded_goal())
    gateway = LLMGateway(LLMSettings(), set(), "replay", recorded=record)
    cause = TaskAssigned(**at(10), task_id=TASK, kind="researcher", instruction="12*7", goal_text="What is 12*7?")

    completion = await gateway.complete(
        model="offline/default", prompt=Prompt("researcher", "v1", "role: agent"), messages=[{"role": "user", "content": "q"}],
        purpose="step", agent="researcher", cause=cause, step_id=f"{TASK}:0",
    )

    assert [(c.name, c.raw_arguments) for c in completion.tool_calls] == [("calculator", '{"expression": "12*7"}')]
    assert completion.assistant_message["tool_calls"][0]["id"] == "call_0"
    new = completion.record
    assert (new.input_tokens, new.output_tokens, new.cost_usd, new.instance) == (11, 7, 0.25, "replay")
    assert new.causation_id == cause.event_id
    assert gateway.model_calls == 0 and gateway.offline.calls == 0


def test_tool_results_and_recalls_come_from_the_record_by_call_and_request_id() -> None:
    events = recorded_goal()
    record = GoalRecord(events)
    [request] = [e for e in events if isinstance(e, ToolCallRequested)]
    [recall] = [e for e in events if isinstance(e, MemoryRecallRequested)]
    again = request.model_copy(update={"event_id": "new"})

    reply = record.tool_result(again, {"expression": "12*7"}, side_effect=False)
    hits = record.recall(recall.model_copy(update={"event_id": "new-recall"}))

    assert reply is not None and (reply.ok, reply.output, reply.replayed, reply.causation_id) == (True, "12*7 = 84", True, "new")
    assert hits is not None and [h.memory_id for h in hits.hits] == ["m1"]
    other = request.model_copy(update={"call_id": f"{TASK}:9:0"})
    with pytest.raises(Permanent, match=rf"replay diverged at tool call {TASK}:9:0 \(calculator\)"):
        record.tool_result(other, {"expression": "12*7"}, side_effect=False)


def test_a_what_if_run_matches_tool_calls_by_arguments_and_never_repeats_a_side_effect() -> None:
    events = recorded_goal()
    record = GoalRecord(events, what_if=True)
    [request] = [e for e in events if isinstance(e, ToolCallRequested)]
    elsewhere = request.model_copy(update={"call_id": "g-1.r2:0:0", "task_id": "g-1.r2"})

    same = record.tool_result(elsewhere, {"expression": "12*7"}, side_effect=False)
    live = record.tool_result(elsewhere, {"expression": "1+1"}, side_effect=False)
    note = request.model_copy(update={"tool": "save_note"})
    withheld = record.tool_result(note, {"title": "t", "body": "new"}, side_effect=True)

    assert same is not None and same.output == "12*7 = 84" and same.call_id == "g-1.r2:0:0"
    assert live is None and record.live["tool"] == 1  # no side effect: it runs
    assert withheld is not None and not withheld.ok and "not run: save_note has a side effect" in (withheld.error or "")
    assert record.withheld == ['save_note {"body":"new","title":"t"}']


def test_the_causal_order_does_not_depend_on_the_order_the_recorder_wrote() -> None:
    events = recorded_goal()
    shuffled = events[::-1]

    assert causal_order(shuffled, GOAL) == causal_order(events, GOAL)
    assert causal_order(events, GOAL)["r1"] == [
        "task.assigned", "memory.recall_requested", "memory.recall_completed", "llm.call_recorded step",
        "tool.requested calculator", "tool.completed calculator", "llm.call_recorded step", "task.completed",
    ]
    assert causal_order(events, GOAL)["goal"] == [
        "goal.submitted", "llm.call_recorded plan", "goal.planned", "llm.call_recorded answer", "goal.completed",
    ]
    same = compare(events, shuffled, GOAL)
    assert same.identical and same.events == len(events) and same.tasks == 1


def test_a_replay_that_differs_names_the_first_difference() -> None:
    events = recorded_goal()
    without_tool = [e for e in events if not isinstance(e, ToolCallRequested | ToolCallCompleted)]
    other_answer = [e for e in events if not isinstance(e, GoalCompleted)] + [GoalCompleted(**at(9), answer="85")]

    skipped = compare(events, without_tool, GOAL)
    answered = compare(events, other_answer, GOAL)

    assert not skipped.identical
    assert skipped.difference == "task r1, event 5: the record has tool.requested calculator, the replay llm.call_recorded step"
    assert not answered.identical and answered.difference == 'the end differs: the record answered "It is 84.", the replay answered "85"'
