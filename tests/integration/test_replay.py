"""`switchboard replay` on a goal the real pipeline ran on Kafka and Redis: a deterministic replay
calls no model and repeats no side effect; a what-if run with another prompt version is compared."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner, Result

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline
from schemas.events import GoalCompleted, GoalSubmitted
from schemas.topics import Topics
from services.ops.cli import app
from services.ops.replay import causal_order
from services.ops.trace_view import recorded_events
from services.runtime.host import Settings
from services.runtime.offline_model import Turn
from tests.integration.conftest import EVERY_SERVICE, serving
from tests.support.kafka import RawProducer, TopicWatch, eventually, unique

SERVICES = EVERY_SERVICE


def no_model_calls(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
    """The offline model of the replay: a replay that calls it has failed."""
    raise AssertionError("the replay called the model")


async def switchboard(settings: Settings, *args: str, **env: str) -> Result:
    """The command as a user runs it, pointed at this test's namespace and Redis, without Kafka."""
    base = {"SWITCHBOARD_NAMESPACE": settings.platform.namespace, "REDIS_URL": settings.redis.url or "", "COLUMNS": "250"}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=base | env)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def notes(sandbox: Path) -> list[str]:
    path = sandbox / "acme" / "notes.jsonl"
    return path.read_text().splitlines() if path.exists() else []


async def run_goal(settings: Settings, redis: Redis, text: str) -> tuple[GoalSubmitted, GoalCompleted, list[Any]]:
    """Runs a goal through every service on Kafka; returns it, its end and its record once complete."""
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    goal = GoalSubmitted(tenant="acme", goal_id=unique("g"), text=text)
    timeline = GoalTimeline(redis, RedisKeys(settings.platform.namespace), 0, 0)
    async with serving(SERVICES, settings), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        done = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=120)
        seen = {s.event.event_id for s in await watch.caught_up() if s.event and s.event.goal_id == goal.goal_id}

        async def all_recorded() -> bool:
            return seen <= {e.event_id for e in await timeline.read("acme", goal.goal_id)}

        await eventually(all_recorded)
    return goal, done, await recorded_events(timeline, "acme", goal.goal_id) or []


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where save_note writes, for the recorded run and the replay alike."""
    path = tmp_path / "notes-sandbox"
    monkeypatch.setenv("TOOLS_SANDBOX_DIR", str(path))
    return path


async def test_a_replay_makes_no_model_call_repeats_no_side_effect_and_ends_the_same(
    settings: Settings, redis: Redis, sandbox: Path
) -> None:
    goal, done, record = await run_goal(settings, redis, "What is 12*7 and what is Redis?")
    saved = notes(sandbox)
    assert len(saved) == 1  # the writer saved its note once

    result = ok(await switchboard(
        settings, "replay", goal.goal_id, "--tenant", "acme", "--json",
        LLM_OFFLINE_SCRIPT=f"{__name__}:no_model_calls", TOOLS_SANDBOX_DIR=str(sandbox),
    ))
    data = json.loads(result.stdout)

    order = causal_order(record, goal.goal_id)
    assert data["identical"] is True and data["comparison"]["difference"] is None
    assert data["recorded_order"] == data["replayed_order"] == order
    assert set(order) == {"goal", "r1", "r2", "w1"} and "tool.requested save_note" in order["w1"]
    assert data["replayed"] == data["recorded"] == {"status": "completed", "answer": done.answer}
    run = data["run"]
    assert run["model_calls"] == 0 and run["diverged"] == [] and run["failures"] == 0
    assert run["answered"]["model"] == len([e for e in record if e.event_type == "llm.call_recorded"])
    assert run["answered"]["tool"] == len([e for e in record if e.event_type == "tool.completed"])
    assert notes(sandbox) == saved  # save_note did not run again

    tree = ok(await switchboard(settings, "replay", goal.goal_id, "--tenant", "acme")).stdout
    assert "identical" in tree and "0 model call(s) made" in tree
    missing = await switchboard(settings, "replay", goal.goal_id, "--tenant", "someone-else")
    assert missing.exit_code == 2 and "no record of goal" in missing.output


async def test_a_what_if_run_with_another_prompt_version_is_shown_beside_the_recorded_run(
    settings: Settings, redis: Redis, sandbox: Path
) -> None:
    goal, done, _ = await run_goal(settings, redis, "What is 2^10 and what is Kafka?")
    saved = notes(sandbox)

    result = ok(await switchboard(
        settings, "replay", goal.goal_id, "--tenant", "acme", "--prompt-version", "v2", "--json",
        TOOLS_SANDBOX_DIR=str(sandbox),
    ))
    data = json.loads(result.stdout)

    assert data["mode"] == "what-if"
    assert "researcher.v1" in data["recorded"]["prompt_versions"]
    assert "researcher.v2" in data["what_if"]["prompt_versions"] and "researcher.v1" not in data["what_if"]["prompt_versions"]
    assert data["diff"]["prompt_versions"]["changed"] is True
    assert set(data["diff"]) >= {"plan", "tool_calls", "input_tokens", "output_tokens", "cost_usd", "answer"}
    assert data["run"]["model_calls"] == data["what_if"]["llm_calls"] > 0  # the model was called this time
    assert data["recorded"]["answer"] == done.answer
    assert notes(sandbox) == saved  # the writer's note came from the record, not a new write

    table = ok(await switchboard(settings, "replay", goal.goal_id, "--tenant", "acme", "--prompt-version", "v2")).stdout
    assert "recorded vs what-if" in table and "≠ prompt versions" in table
    unknown = await switchboard(settings, "replay", goal.goal_id, "--tenant", "acme", "--prompt-version", "v9")
    assert unknown.exit_code == 2 and "no prompt has a version v9" in unknown.output
