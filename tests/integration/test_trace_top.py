"""`switchboard trace` on goals the real pipeline ran (one answered, one stopped by its budget), and
`switchboard top` while a goal runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner, Result

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline
from schemas.budget import BudgetLimits
from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    GoalSubmitted,
    LLMCallRecorded,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.topics import Topics
from services.ops.cli import app
from services.runtime.host import Settings
from services.runtime.settings import BudgetSettings
from tests.integration.conftest import EVERY_SERVICE, KINDS, serving
from tests.support.kafka import RawProducer, TopicWatch, eventually, unique
from tests.support.scripts import looping

SERVICES = EVERY_SERVICE


async def switchboard(settings: Settings, *args: str) -> Result:
    """The command as a user runs it, pointed at this test's namespace (in a thread: it runs its own loop)."""
    env = {
        "SWITCHBOARD_NAMESPACE": settings.platform.namespace,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "REDIS_URL": settings.redis.url or "",
        "COLUMNS": "250",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


async def recorded(redis: Redis, settings: Settings, goal_id: str, event_ids: set[str]) -> bool:
    """Whether the goal's timeline holds all of `event_ids` (the recorder reads each topic on its own)."""
    timeline = GoalTimeline(redis, RedisKeys(settings.platform.namespace), 0, 0)
    return event_ids <= {e.event_id for e in await timeline.read("acme", goal_id)}


def steps_of(trace: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in trace["steps"] + [s for t in trace["tasks"] for s in t["steps"]] if s["type"] == kind]


async def test_trace_shows_the_plan_every_model_and_tool_call_and_the_answer_of_a_goal(settings: Settings, redis: Redis) -> None:
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id=unique("g"), text="What is 12*7 and what is Redis?")
    async with serving(SERVICES, settings), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        done = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=120)
        seen = {s.event.event_id: s.event for s in await watch.caught_up() if s.event and s.event.goal_id == goal.goal_id}
        await eventually(lambda: recorded(redis, settings, goal.goal_id, set(seen)))
    events: list[Envelope] = list(seen.values())
    [planned] = [e for e in events if isinstance(e, GoalPlanned)]
    calls = [e for e in events if isinstance(e, LLMCallRecorded)]
    requests = {e.call_id: e for e in events if isinstance(e, ToolCallRequested)}
    replies = {e.call_id: e for e in events if isinstance(e, ToolCallCompleted)}

    trace = json.loads(ok(await switchboard(settings, "trace", goal.goal_id, "--tenant", "acme", "--json")).stdout)

    assert [(p["id"], p["kind"], p["depends_on"]) for p in trace["plan"]["tasks"]] == [
        (p.id, p.kind, p.depends_on) for p in planned.plan.tasks
    ]
    assert [task["id"] for task in trace["tasks"]] == [p.id for p in planned.plan.tasks]
    assert all(task["status"] == "completed" for task in trace["tasks"])
    traced_calls = steps_of(trace, "llm_call")
    assert len(traced_calls) == len(calls) >= len(planned.plan.tasks) + 2  # planning, each task, the answer
    assert sum(c["input_tokens"] for c in traced_calls) == sum(c.input_tokens for c in calls)
    assert sum(c["output_tokens"] for c in traced_calls) == sum(c.output_tokens for c in calls)
    assert trace["totals"]["tokens"] == sum(c.input_tokens + c.output_tokens for c in calls)
    assert {c["purpose"] for c in traced_calls} == {"plan", "step", "answer"}
    tools = steps_of(trace, "tool_call")
    assert requests and {s["call_id"]: (s["tool"], s["ok"]) for s in tools} == {
        call_id: (r.tool, replies[call_id].ok) for call_id, r in requests.items()
    }
    assert trace["outcome"]["status"] == "completed" and trace["outcome"]["answer"] == done.answer
    assert trace["dead_letters"] == []

    tree = ok(await switchboard(settings, "trace", goal.goal_id, "--tenant", "acme")).stdout
    assert f"goal {goal.goal_id}" in tree and "✓ answer" in tree and f"{len(calls)} model call(s)" in tree

    missing = await switchboard(settings, "trace", goal.goal_id, "--tenant", "someone-else")
    assert missing.exit_code == 2
    assert "for tenant someone-else" in missing.output and "MEMORY_STREAM_TTL_S" in missing.output


async def test_trace_of_a_goal_stopped_by_its_budget_shows_its_dead_letter_and_reason(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_MAX_STEPS", "500")  # only the goal's budget stops the task
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id=unique("g"), text="count forever", budget=BudgetLimits(max_tokens=3_000))
    async with serving(SERVICES, settings, looping(["r1"])), TopicWatch(settings.kafka, [*t.work_topics(), *t.dlq_topics()]) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        failed = await watch.event(GoalFailed, goal_id=goal.goal_id, timeout=120)
        [dead] = await watch.wait_for(lambda s: Topics.is_dlq(s.topic) and s.headers.get("x-dlq-goal-id") == goal.goal_id)
        await eventually(lambda: recorded(redis, settings, goal.goal_id, {failed.event_id}))

    trace = json.loads(ok(await switchboard(settings, "trace", goal.goal_id, "--tenant", "acme", "--json")).stdout)

    [letter] = trace["dead_letters"]
    assert letter["reason"] == dead.headers["x-dlq-reason"] == "budget_exceeded"
    assert letter["dlq_topic"] == dead.topic == Topics.dlq(t.agent("researcher"))
    assert trace["outcome"]["status"] == "failed" and trace["outcome"]["reason"] == failed.reason == "budget_exceeded"
    assert trace["outcome"]["figures"] == failed.figures and failed.figures["limit"] == 3_000
    [task] = trace["tasks"]
    assert any(s["type"] == "dead_lettered" and s["reason"] == "budget_exceeded" for s in task["steps"])
    assert len(steps_of(trace, "llm_call")) > 3  # it looped

    tree = ok(await switchboard(settings, "trace", goal.goal_id, "--tenant", "acme")).stdout
    assert "dead letters (1)" in tree and "✗ goal failed (budget_exceeded, limit 3000" in tree


async def test_top_shows_the_steps_and_tokens_of_a_goal_while_it_runs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_MAX_STEPS", "500")
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    # A goal that keeps stepping, ten calls a second at most, for far longer than `top` watches.
    running = dataclasses.replace(
        settings,
        llm=settings.llm.model_copy(update={"offline_latency_ms": "100", "offline_cost_per_1k_tokens": 0.01}),
        budget=BudgetSettings(max_steps=10_000, max_tokens=100_000_000, max_tool_calls=10_000),
    )
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id=unique("g"), text="count on and on")
    async with serving(SERVICES, running, looping(["r1"])), TopicWatch(settings.kafka, [t.llm_calls]) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        await watch.wait_for(lambda s: isinstance(s.event, LLMCallRecorded) and s.event.purpose == "step", timeout=120)
        snapshot = json.loads(ok(await switchboard(settings, "top", "--once", "--json", "--interval", "3")).stdout)
        assert not [s for s in watch.seen if isinstance(s.event, GoalCompleted | GoalFailed)]  # it ran throughout

    assert snapshot["steps_per_s"]["researcher"] > 0
    assert snapshot["tokens_per_s"] > 0 and snapshot["llm_calls"] > 0 and snapshot["tokens"] > 0
    [acme] = [b for b in snapshot["tenants"] if b["tenant"] == "acme"]
    assert acme["cost_per_min"] > 0 and acme["budget_failures"] == 0
