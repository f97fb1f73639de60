"""The dead-letter contract: every reason path writes exactly one record, with every header right.

Each case provokes its failure for real, through the running services on Kafka and Redis.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm
import pytest

from schemas.budget import BudgetLimits
from schemas.events import (
    GoalCompleted,
    GoalFailed,
    GoalSubmitted,
    ToolCallRequested,
    decode_event,
)
from schemas.topics import Topics
from services.runtime.host import Settings
from services.runtime.offline_model import ToolCall, Turn, default_turn, role_of
from services.runtime.pipeline import MAX_MESSAGE_BYTES
from tests.integration.conftest import EVERY_SERVICE, KINDS, serving
from tests.support.kafka import RawProducer, Seen, TopicWatch

SERVICES = EVERY_SERVICE


@dataclass(frozen=True)
class Expected:
    topic: str
    group: str
    goal_id: str
    exception: str
    attempts: int = 1
    value: bytes | None = None
    """What was sent, when the test sent the dead message itself."""
    fails_goal: bool = False


@dataclass
class Ctx:
    settings: Settings
    topics: Topics
    send: RawProducer

    def group(self, name: str) -> str:
        return f"{self.settings.platform.namespace}.{name}"


Provoke = Callable[[Ctx], Awaitable[Expected]]


async def not_json(c: Ctx) -> Expected:
    value = b"\x00\x01 this is not JSON"
    await c.send.send(c.topics.goals, value, key="g-after")
    return Expected(c.topics.goals, c.group("orchestrator"), "", "ValidationError", value=value)


async def oversize(c: Ctx) -> Expected:
    value = json.dumps({"event_type": "task.assigned", "goal_id": "g-big", "pad": "x" * MAX_MESSAGE_BYTES}).encode()
    await c.send.send(c.topics.agent("researcher"), value, key="g-big")
    return Expected(c.topics.agent("researcher"), c.group("agent.researcher"), "g-big", "ValueError", value=value)


async def schema_invalid(c: Ctx) -> Expected:
    value = json.dumps({"event_type": "tool.requested", "tenant": "acme", "goal_id": "g-schema"}).encode()
    await c.send.send(c.topics.tools, value, key="g-schema")
    return Expected(c.topics.tools, c.group("tools"), "g-schema", "ValidationError", value=value)


async def unknown_event(c: Ctx) -> Expected:
    value = json.dumps({"event_type": "goal.exploded", "tenant": "acme", "goal_id": "g-unknown"}).encode()
    await c.send.send(c.topics.memory, value, key="g-unknown")
    return Expected(c.topics.memory, c.group("memory"), "g-unknown", "ValidationError", value=value)


async def budget_exceeded(c: Ctx) -> Expected:
    # The planner's call is the goal's one step: the researcher's first call is refused.
    goal = GoalSubmitted(tenant="acme", goal_id="g-budget", text="What is 6*7", budget=BudgetLimits(max_steps=1))
    await c.send.event(c.topics.goals, goal)
    return Expected(c.topics.agent("researcher"), c.group("agent.researcher"), goal.goal_id, "BudgetExceeded", fails_goal=True)


async def deadline_exceeded(c: Ctx) -> Expected:
    goal = GoalSubmitted(tenant="acme", goal_id="g-late", text="What is 6*7", budget=BudgetLimits(deadline_s=0.001))
    value = goal.to_bytes()
    await c.send.send(c.topics.goals, value, key=goal.goal_id)
    return Expected(c.topics.goals, c.group("orchestrator"), goal.goal_id, "DeadlineExceeded", value=value, fails_goal=True)


async def runaway_loop(c: Ctx) -> Expected:
    goal = GoalSubmitted(tenant="acme", goal_id="g-loop", text="What is 1+1")
    await c.send.event(c.topics.goals, goal)
    return Expected(c.topics.agent("researcher"), c.group("agent.researcher"), goal.goal_id, "RunawayLoop", fails_goal=True)


async def tool_denied(c: Ctx) -> Expected:
    forged = ToolCallRequested(
        tenant="acme", goal_id="g-forged", task_id="g-forged.w1", call_id="c1", step_id="g-forged.w1:0",
        tool="calculator", arguments={"expression": "1+1"}, agent_kind="writer", reply_to=c.topics.agent("writer"),
    )
    value = forged.to_bytes()
    # Signed, as an agent's request is: the executor's own allowlist check refuses it.
    await c.send.send(c.topics.tools, value, key="g-forged.w1", signed=True)
    return Expected(c.topics.tools, c.group("tools"), forged.goal_id, "ToolDenied", value=value)


async def tool_failed(c: Ctx) -> Expected:
    # save_note cannot create its tenant directory: a regular file is in the way.
    blocked = Path(c.settings.platform.data_dir) / "sandbox" / "acme"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("in the way")
    goal = GoalSubmitted(tenant="acme", goal_id="g-broken", text="What is 6*7")
    await c.send.event(c.topics.goals, goal)
    return Expected(c.topics.tools, c.group("tools"), goal.goal_id, "ToolFailed", fails_goal=True)


async def retries_exhausted(c: Ctx) -> Expected:
    goal = GoalSubmitted(tenant="acme", goal_id="g-limited", text="What is 6*7")
    value = goal.to_bytes()
    await c.send.send(c.topics.goals, value, key=goal.goal_id)
    return Expected(c.topics.goals, c.group("orchestrator"), goal.goal_id, "Retryable", attempts=2, value=value, fails_goal=True)


async def approval_denied(c: Ctx) -> Expected:
    # save_note needs approval here, and nobody decides in time: the timeout denies it.
    goal = GoalSubmitted(tenant="acme", goal_id="g-unapproved", text="What is 6*7")
    await c.send.event(c.topics.goals, goal)
    return Expected(c.topics.tools, c.group("tools"), goal.goal_id, "Permanent", fails_goal=True)


APPROVAL_TIMES_OUT = {"TOOLS_NEEDS_APPROVAL": "save_note", "TOOLS_APPROVAL_TIMEOUT_S": "1", "TOOLS_APPROVAL_SWEEP_S": "0.2"}


def repeating(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
    if role_of(messages) == "agent":
        return Turn(tool_calls=[ToolCall("calculator", {"expression": "1+1"})])
    return default_turn(messages, tools)


def rate_limited(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
    raise litellm.exceptions.RateLimitError("slow down", llm_provider="offline", model="offline/default")


CASES: dict[str, tuple[Provoke, Any, dict[str, str]]] = {
    "poison": (not_json, None, {}),
    "poison-oversize": (oversize, None, {}),
    "schema_invalid": (schema_invalid, None, {}),
    "unknown_event": (unknown_event, None, {}),
    "budget_exceeded": (budget_exceeded, None, {}),
    "deadline_exceeded": (deadline_exceeded, None, {}),
    "runaway_loop": (runaway_loop, repeating, {}),
    "tool_denied": (tool_denied, None, {}),
    "tool_failed": (tool_failed, None, {}),
    "retries_exhausted": (retries_exhausted, rate_limited, {}),
    "approval_denied": (approval_denied, None, APPROVAL_TIMES_OUT),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_reason_path_writes_one_dead_letter_record_with_every_header(
    case: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    provoke, script, env = CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = dataclasses.replace(
        settings, platform=settings.platform.model_copy(update={"retry_attempts": 2, "retry_backoff_s": 0.1})
    )
    t = Topics(settings.platform.namespace, KINDS)
    reason = case.split("-")[0]
    async with serving(SERVICES, settings, script), TopicWatch(settings.kafka, [t.progress, *t.dlq_topics()]) as watch, RawProducer(settings.kafka) as send:
        expected = await provoke(Ctx(settings, t, send))
        [record] = await watch.wait_for(lambda s: Topics.is_dlq(s.topic), timeout=90)
        if expected.fails_goal:
            failed = await watch.event(GoalFailed, goal_id=expected.goal_id, timeout=90)
            assert failed.reason == reason
        # The consumers keep going: a normal goal still completes after the failure.
        after = GoalSubmitted(tenant="other", goal_id="g-after", text="What is 2+2")
        if script is None and not env:
            await send.event(t.goals, after)
            await watch.event(GoalCompleted, goal_id="g-after", timeout=90)

    dead = [s for s in watch.seen if Topics.is_dlq(s.topic)]
    assert len(dead) == 1, [(d.topic, d.headers.get("x-dlq-reason")) for d in dead]
    check_headers(record, reason, expected)


def check_headers(record: Seen, reason: str, expected: Expected) -> None:
    h = record.headers
    assert record.topic == Topics.dlq(expected.topic)
    assert h["x-dlq-reason"] == reason
    assert h["x-dlq-original-topic"] == expected.topic
    assert h["x-dlq-original-partition"].isdigit() and h["x-dlq-original-offset"].isdigit()
    assert int(h["x-dlq-original-timestamp"]) > 1_700_000_000_000  # ms since the epoch
    assert h["x-dlq-consumer-group"] == expected.group
    assert expected.exception in h["x-dlq-exception-class"] or h["x-dlq-exception-class"] == expected.exception
    assert h["x-dlq-exception-message"].strip()
    assert h["x-dlq-attempts"] == str(expected.attempts)
    assert h["x-dlq-goal-id"] == expected.goal_id
    assert re.fullmatch(r"[0-9a-f]{32}", h["x-dlq-trace-id"])
    assert h["traceparent"].split("-")[1] == h["x-dlq-trace-id"]  # the original headers are kept
    if expected.value is not None:
        assert record.value == expected.value  # the original value, untouched
    else:
        event = decode_event(record.value)
        assert event.goal_id == expected.goal_id and record.key == (event.task_id or event.goal_id).encode()
