"""`switchboard replay` of goals that ended by the paths issue 8 added: through a goal type's
fallback, and with a delegated subtask. Each replays to the same events and answer with no model
call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline
from schemas.budget import BudgetLimits
from schemas.events import GoalAnswered, GoalCompleted, GoalEscalated, GoalSubmitted
from schemas.topics import Topics
from services.runtime.host import Settings
from services.runtime.offline_model import Script
from tests.integration.conftest import EVERY_SERVICE, serving
from tests.integration.test_replay import no_model_calls, ok, switchboard
from tests.support.kafka import RawProducer, TopicWatch, eventually, unique
from tests.support.scripts import delegating


async def recorded_run(
    settings: Settings, redis: Redis, goal: GoalSubmitted, script: Script | None = None, answer: str | None = None,
) -> GoalCompleted:
    """Runs the goal through every service on Kafka (a person gives `answer` when it escalates);
    returns its end once all of it is recorded."""
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    timeline = GoalTimeline(redis, RedisKeys(settings.platform.namespace), 0, 0)
    async with serving(EVERY_SERVICE, settings, script), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal, signed=True)
        if answer is not None:
            await watch.event(GoalEscalated, goal_id=goal.goal_id, timeout=120)
            given = GoalAnswered(tenant=goal.tenant, goal_id=goal.goal_id, answer=answer, answered_by="ana")
            await send.event(t.goals, given, signed=True)
        done: GoalCompleted = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=120)
        seen = {s.event.event_id for s in await watch.caught_up() if s.event and s.event.goal_id == goal.goal_id}

        async def all_recorded() -> bool:
            return seen <= {e.event_id for e in await timeline.read(goal.tenant, goal.goal_id)}

        await eventually(all_recorded)
    return done


async def replayed(settings: Settings, goal: GoalSubmitted, sandbox: Path) -> dict[str, Any]:
    result = ok(await switchboard(
        settings, "replay", goal.goal_id, "--tenant", goal.tenant, "--json",
        LLM_OFFLINE_SCRIPT=f"{no_model_calls.__module__}:no_model_calls", TOOLS_SANDBOX_DIR=str(sandbox),
    ))
    data: dict[str, Any] = json.loads(result.stdout)
    return data


async def test_a_goal_that_completed_through_its_fallback_replays_the_same(
    settings: Settings, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOOLS_SANDBOX_DIR", str(tmp_path))
    # One planned task (and its writer), and one model call allowed: the plan. The researcher's
    # first step is refused, so the fallback answers.
    goal = GoalSubmitted(
        tenant="acme", goal_id=unique("g"), text="What is 12*7?", goal_type="arithmetic", budget=BudgetLimits(max_steps=1),
    )
    done = await recorded_run(settings, redis, goal)
    assert (done.path, done.answer) == ("fallback", "12*7 = 84")

    data = await replayed(settings, goal, tmp_path)
    assert data["identical"] is True, data["comparison"]
    assert data["replayed"] == data["recorded"] == {"status": "completed", "answer": done.answer}
    assert data["recorded_order"]["fallback"] == ["tool.requested arithmetic_answer", "tool.completed arithmetic_answer"]
    assert data["run"]["model_calls"] == 0 and data["run"]["diverged"] == []


async def test_a_goal_with_a_delegated_subtask_replays_the_same(
    settings: Settings, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOOLS_SANDBOX_DIR", str(tmp_path))
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    goal = GoalSubmitted(tenant="acme", goal_id=unique("g"), text="What is 12*7")
    # The packaged writer hands the question to a researcher, whose answer comes back to it.
    done = await recorded_run(settings, redis, goal, delegating("writer", delegators=("writer",)))
    assert "84" in done.answer

    data = await replayed(settings, goal, tmp_path)
    assert data["identical"] is True, data["comparison"]
    assert data["replayed"] == data["recorded"] == {"status": "completed", "answer": done.answer}
    child = next(k for k in data["recorded_order"] if "/researcher-" in k)
    assert "tool.requested calculator" in data["recorded_order"][child]
    assert data["run"]["model_calls"] == 0 and data["run"]["diverged"] == []


async def test_a_goal_a_person_answered_replays_with_the_same_answer(
    settings: Settings, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOOLS_SANDBOX_DIR", str(tmp_path))
    goal = GoalSubmitted(
        tenant="acme", goal_id=unique("g"), text="What is 12*7?", goal_type="reviewed", budget=BudgetLimits(max_steps=1),
    )
    done = await recorded_run(settings, redis, goal, answer="84, by hand")
    assert (done.path, done.answer) == ("human", "84, by hand")

    data = await replayed(settings, goal, tmp_path)
    assert data["identical"] is True, data["comparison"]
    assert data["replayed"] == data["recorded"] == {"status": "completed", "answer": "84, by hand"}
    assert data["run"]["model_calls"] == 0
