"""The goal trace: events in any order make one timeline, with each step under its task, requests
paired with their replies, the dead letters, the end and the totals; the tree shows what the JSON says."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console

from schemas.budget import BudgetLimits
from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalFailed,
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
    WorkDeadLettered,
)
from schemas.plan import Plan, PlannedTask
from services.ops.dlq import DeadLetter
from services.ops.trace_view import build_trace, trace_tree

T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
GOAL = dict(tenant="acme", goal_id="g-1")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def llm(seconds: float, purpose: str, agent: str, task_id: str | None, tokens: tuple[int, int], **extra: Any) -> LLMCallRecorded:
    return LLMCallRecorded(
        **GOAL, task_id=task_id, ts=at(seconds), purpose=purpose, agent=agent, model="offline/default",
        prompt_version=f"{agent}.v1", prompt_hash="h", messages=[], response={}, input_tokens=tokens[0],
        output_tokens=tokens[1], cost_usd=0.001, latency_ms=12.5, instance="host:1", **extra,
    )


def completed_goal() -> list[Envelope]:
    r1, w1 = "g-1.r1", "g-1.w1"
    plan = Plan(tasks=[
        PlannedTask(id="r1", kind="researcher", instruction="Work out 12*7"),
        PlannedTask(id="w1", kind="writer", instruction="Write it up", depends_on=["r1"]),
    ])
    tool = dict(**GOAL, task_id=r1, step_id="g-1.r1:1")
    return [
        GoalSubmitted(**GOAL, ts=at(0), text="What is 12*7?", budget=BudgetLimits(max_steps=20)),
        llm(0.1, "plan", "orchestrator", None, (100, 40)),
        GoalPlanned(**GOAL, ts=at(0.2), plan=plan, model="offline/default", prompt_version="planner.v1",
                    budget=BudgetLimits(max_steps=20, max_tokens=5_000)),
        TaskAssigned(**GOAL, task_id=r1, ts=at(0.3), kind="researcher", instruction="Work out 12*7", goal_text="What is 12*7?"),
        MemoryRecallRequested(**GOAL, task_id=r1, ts=at(0.4), request_id="q1", query="12*7", reply_to="x"),
        MemoryRecallCompleted(**GOAL, task_id=r1, ts=at(0.5), request_id="q1", hits=[
            MemoryHit(memory_id="m1", kind="lesson", text="do not guess", score=0.9, label="FAILED (guess): do not repeat"),
        ]),
        llm(0.6, "step", "researcher", r1, (200, 30), context_tokens=180, full_history_tokens=400),
        ToolCallRequested(**tool, ts=at(0.7), call_id="c1", tool="calculator", arguments={"expression": "12*7"},
                          agent_kind="researcher", reply_to="x"),
        ToolCallCompleted(**tool, ts=at(0.75), call_id="c1", tool="calculator", ok=True, output="12*7 = 84"),
        ToolCallRequested(**tool, ts=at(0.8), call_id="c2", tool="save_note", arguments={"title": "t"},
                          agent_kind="researcher", reply_to="x"),
        ToolCallCompleted(**tool, ts=at(0.9), call_id="c2", tool="save_note", ok=False, output="", error="denied",
                          replayed=True),
        llm(1.0, "step", "researcher", r1, (250, 20)),
        TaskCompleted(**GOAL, task_id=r1, ts=at(1.1), kind="researcher", result="84", steps=2),
        TaskAssigned(**GOAL, task_id=w1, ts=at(1.2), kind="writer", instruction="Write it up", goal_text="What is 12*7?",
                     inputs={"r1": "84"}),
        llm(1.3, "step", "writer", w1, (120, 25)),
        TaskCompleted(**GOAL, task_id=w1, ts=at(1.4), kind="writer", result="12*7 is 84", steps=1),
        llm(1.5, "answer", "orchestrator", None, (90, 10)),
        GoalCompleted(**GOAL, ts=at(1.6), answer="12*7 is 84", task_results={"r1": "84", "w1": "12*7 is 84"}),
    ]


def test_events_in_any_order_make_one_timeline_with_each_step_under_its_task() -> None:
    events = completed_goal()
    shuffled = random.Random(7).sample(events, len(events))  # the recorder reads topics side by side
    data = build_trace("g-1", "acme", shuffled, []).to_json()

    assert data["text"] == "What is 12*7?" and data["started_at"] == T0.isoformat()
    assert data["plan"]["budget"] == {"max_steps": 20, "max_tokens": 5_000}
    assert [(t["id"], t["kind"], t["depends_on"]) for t in data["plan"]["tasks"]] == [("r1", "researcher", []), ("w1", "writer", ["r1"])]
    assert [s["type"] for s in data["steps"]] == ["submitted", "llm_call", "llm_call", "goal_completed"]
    r1, w1 = data["tasks"]
    assert (r1["id"], r1["status"], w1["id"], w1["status"]) == ("r1", "completed", "w1", "completed")
    assert [s["type"] for s in r1["steps"]] == ["assigned", "recall", "llm_call", "tool_call", "tool_call", "llm_call", "task_completed"]
    recall = r1["steps"][1]
    assert recall["query"] == "12*7" and recall["hits"][0]["kind"] == "lesson"
    assert recall["hits"][0]["label"] == "FAILED (guess): do not repeat"
    step = r1["steps"][2]
    assert (step["model"], step["prompt_version"], step["input_tokens"], step["output_tokens"]) == ("offline/default", "researcher.v1", 200, 30)
    assert (step["context_tokens"], step["full_history_tokens"], step["latency_ms"], step["t_s"]) == (180, 400, 12.5, 0.6)
    calc, note = r1["steps"][3], r1["steps"][4]
    assert (calc["tool"], calc["arguments"], calc["ok"], calc["output"], calc["latency_ms"]) == ("calculator", {"expression": "12*7"}, True, "12*7 = 84", 50.0)
    assert (note["ok"], note["error"], note["replayed"]) == (False, "denied", True)
    assert w1["steps"][0]["inputs"] == ["r1"]
    assert data["outcome"]["status"] == "completed" and data["outcome"]["answer"] == "12*7 is 84"
    assert data["totals"] == {
        "llm_calls": 5, "input_tokens": 760, "output_tokens": 125, "tokens": 885, "cost_usd": 0.005,
        "llm_latency_ms": 62.5, "tool_calls": 2, "tool_errors": 1, "recalls": 1, "dead_letters": 0, "wall_time_s": 1.6,
    }
    json.dumps(data)  # one JSON document


def test_events_of_other_goals_and_a_reply_without_its_request_are_kept_apart() -> None:
    stray = ToolCallCompleted(**GOAL, task_id="g-1.r9", step_id="s", ts=at(2), call_id="c9", tool="calculator", ok=True, output="1")
    other = GoalSubmitted(tenant="acme", goal_id="g-2", ts=at(0), text="else")
    data = build_trace("g-1", "acme", [*completed_goal(), stray, other], []).to_json()

    assert [t["id"] for t in data["tasks"]] == ["r1", "w1", "r9"]
    [lonely] = data["tasks"][2]["steps"]
    assert (lonely["tool"], lonely["ok"], lonely["arguments"]) == ("calculator", True, None)
    assert data["text"] == "What is 12*7?"


def failed_goal() -> tuple[list[Envelope], DeadLetter]:
    r1 = "g-1.r1"
    plan = Plan(tasks=[PlannedTask(id="r1", kind="researcher", instruction="Count")])
    assigned = TaskAssigned(**GOAL, task_id=r1, ts=at(0.2), kind="researcher", instruction="Count", goal_text="count")
    events: list[Envelope] = [
        GoalSubmitted(**GOAL, ts=at(0), text="count"),
        GoalPlanned(**GOAL, ts=at(0.1), plan=plan, model="offline/default", prompt_version="planner.v1"),
        assigned,
        llm(0.3, "step", "researcher", r1, (1_500, 10)),
        WorkDeadLettered(**GOAL, task_id=r1, ts=at(0.4), reason="budget_exceeded", detail="tokens over",
                         dead_event_type="task.assigned", dead_event_id=assigned.event_id, dlq_topic="sb.agent.researcher.dlq",
                         original_topic="sb.agent.researcher", original_partition=0, original_offset=3,
                         consumer_group="sb.agent.researcher", figures={"limit": 1_000, "spent": 1_510}),
        GoalFailed(**GOAL, ts=at(0.5), reason="budget_exceeded", detail="task.assigned on sb.agent.researcher",
                   figures={"limit": 1_000, "spent": 1_510}),
    ]
    headers = {
        "x-dlq-reason": "budget_exceeded", "x-dlq-original-topic": "sb.agent.researcher", "x-dlq-goal-id": "g-1",
        "x-dlq-exception-class": "BudgetExceeded", "x-dlq-exception-message": "max_tokens 1000, spent 1510",
        "x-dlq-attempts": "1",
    }
    letter = DeadLetter("sb.agent.researcher.dlq", 0, 5, 1_746_100_800_400, b"g-1.r1", assigned.to_bytes(), headers)
    return events, letter


def test_a_failed_goal_shows_its_dead_letter_and_its_reason_with_the_figures() -> None:
    events, letter = failed_goal()
    data = build_trace("g-1", "acme", events, [letter]).to_json()

    [task] = data["tasks"]
    assert task["status"] == "assigned" and task["steps"][-1]["type"] == "dead_lettered"
    assert task["steps"][-1]["figures"] == {"limit": 1_000, "spent": 1_510}
    [dead] = data["dead_letters"]
    assert (dead["id"], dead["reason"], dead["original_topic"], dead["event_type"]) == (
        "sb.agent.researcher.dlq:0:5", "budget_exceeded", "sb.agent.researcher", "task.assigned",
    )
    assert data["outcome"] == {
        "status": "failed", "at": at(0.5).isoformat(), "reason": "budget_exceeded",
        "detail": "task.assigned on sb.agent.researcher", "figures": {"limit": 1_000, "spent": 1_510},
    }
    assert data["totals"]["dead_letters"] == 1 and data["totals"]["tokens"] == 1_510


def rendered(data: dict[str, Any]) -> str:
    console = Console(width=250, record=True, color_system=None)
    console.print(trace_tree(data))
    return console.export_text()


def test_the_tree_shows_the_plan_calls_tools_dead_letters_end_and_totals() -> None:
    done = rendered(build_trace("g-1", "acme", completed_goal(), []).to_json())
    assert "plan (planner.v1, offline/default): 2 task(s); budget max_steps=20, max_tokens=5000" in done
    assert "w1 writer after r1: Write it up" in done
    assert "llm step researcher offline/default researcher.v1: 200 in, 30 out, context 180 of 400; $0.0010, 12 ms" in done
    assert "tool calculator(expression=12*7) → ok 12*7 = 84" in done
    assert "tool save_note(title=t) → error denied (stored result, not run again)" in done
    assert "lesson FAILED (guess): do not repeat 0.90: do not guess" in done
    assert "✓ answer: 12*7 is 84" in done
    assert "totals: 5 model call(s), 760 in + 125 out = 885 tokens, $0.0050; 2 tool call(s) (1 failed)" in done
    assert "wall time 1.60s" in done
    # In time order: the planning call, the plan, the tasks, the answering call, the end.
    order = ["llm plan", "plan (planner.v1", "task r1", "task w1", "llm answer", "✓ answer", "totals"]
    assert [done.index(line) for line in order] == sorted(done.index(line) for line in order)

    events, letter = failed_goal()
    failed = rendered(build_trace("g-1", "acme", events, [letter]).to_json())
    assert "dead letters (1)" in failed
    assert "budget_exceeded sb.agent.researcher.dlq:0:5 from sb.agent.researcher: task.assigned, BudgetExceeded: max_tokens 1000" in failed
    assert "✗ goal failed (budget_exceeded, limit 1000, spent 1510)" in failed


def test_a_goal_still_running_says_so() -> None:
    events = completed_goal()[:5]
    data = build_trace("g-1", "acme", events, []).to_json()
    assert data["outcome"] == {"status": "running"}
    assert "not finished" in rendered(data)
