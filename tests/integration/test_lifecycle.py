"""Cancel, pause and resume on the real broker: a cancelled goal's tasks stop at their next step on
every replica; a paused and resumed goal ends as an uninterrupted one does, its side effect done once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from click.testing import Result
from redis.asyncio import Redis
from typer.testing import CliRunner

from memory.keys import RedisKeys
from schemas.events import (
    GoalCompleted,
    GoalStateChanged,
    GoalSubmitted,
    LLMCallRecorded,
    TaskAssigned,
    TaskCompleted,
)
from schemas.topics import Topics
from services.ops.cli import app
from services.runtime.budget import BudgetLedger
from services.runtime.host import ServiceSpec, Settings
from services.runtime.settings import BudgetSettings
from tests.integration.conftest import serving
from tests.integration.test_budgets_on_kafka import spread_task_ids
from tests.support.kafka import RawProducer, Seen, TopicWatch, eventually, group_members, uncommitted
from tests.support.scripts import looping


async def switchboard(settings: Settings, *args: str, exit_code: int = 0) -> Result:
    """The command as an operator runs it, on this test's namespace (in a thread: it runs its own loop)."""
    env = {
        "SWITCHBOARD_NAMESPACE": settings.platform.namespace,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "REDIS_URL": settings.redis.url or "",
    }
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)
    assert result.exit_code == exit_code, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


async def checkpoint_status(redis: Redis, keys: RedisKeys, tenant: str, task_id: str) -> str | None:
    raw = await redis.get(keys.task_checkpoint(tenant, task_id))
    return None if raw is None else str(json.loads(raw)["status"])


async def test_cancelling_a_goal_stops_its_tasks_on_both_replicas_at_their_next_step(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_MAX_STEPS", "500")  # only the cancel stops these tasks
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    # A budget that does not stop the goal while the test runs: only the cancel does.
    roomy = BudgetSettings(max_steps=100_000, max_tokens=50_000_000, max_tool_calls=100_000, max_cost_usd=1_000.0)
    settings = dataclasses.replace(settings, budget=roomy)
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    keys = RedisKeys(settings.platform.namespace)
    planned = spread_task_ids("g-cancel", settings.platform.partitions, per_partition=2)
    goal = GoalSubmitted(tenant="acme", goal_id="g-cancel", text="count forever")
    script = looping(planned)
    replicas = [
        dataclasses.replace(settings, platform=settings.platform.model_copy(update={"instance": f"replica-{n}"}))
        for n in (1, 2)
    ]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(serving([ServiceSpec("orchestrator"), ServiceSpec("tools")], settings, script))
        for replica in replicas:
            await stack.enter_async_context(serving([ServiceSpec("agent", {"kind": "researcher"})], replica, script))
        agents = f"{settings.platform.namespace}.agent.researcher"

        async def both_replicas_joined() -> bool:
            return await group_members(settings.kafka, agents) == 2

        await eventually(both_replicas_joined, timeout=90)
        watch = await stack.enter_async_context(TopicWatch(settings.kafka, [t.progress, t.llm_calls]))
        send = await stack.enter_async_context(RawProducer(settings.kafka))
        await send.event(t.goals, goal)

        def step_by(instance: str) -> Seen | None:
            return next((s for s in watch.seen if isinstance(s.event, LLMCallRecorded) and s.event.purpose == "step"
                         and s.event.instance == instance and s.event.goal_id == goal.goal_id), None)

        # Both replicas are stepping through the goal's tasks before it is cancelled.
        await watch.until(lambda _: all(step_by(f"replica-{n}") for n in (1, 2)), timeout=120)
        result = await switchboard(settings, "goal", "cancel", goal.goal_id, "--tenant", "acme", "--by", "ops@test", "--reason", "enough")
        assert f"goal {goal.goal_id} is cancelled (was running)" in result.output
        announced = await watch.event(GoalStateChanged, goal_id=goal.goal_id)

        # Every task parks at its next step: once no call is in flight and the agents and the
        # tools executor have consumed everything, every task is parked and nothing more is asked.
        budget = BudgetLedger(redis, keys, settings.budget)
        task_ids = [f"{goal.goal_id}.{p}" for p in planned]
        agent_topics = list(t.with_retries([t.agent("researcher")]))
        tool_topics = list(t.with_retries([t.tools]))

        async def every_task_parked() -> bool:
            status = await budget.status("acme", goal.goal_id)
            return (
                status is not None and status.in_flight == 0
                and await uncommitted(settings.kafka, f"{settings.platform.namespace}.tools", tool_topics) == 0
                and await uncommitted(settings.kafka, agents, agent_topics) == 0
                and all([await checkpoint_status(redis, keys, "acme", task) == "cancelled" for task in task_ids])
            )

        await eventually(every_task_parked, timeout=90)
        status = await budget.status("acme", goal.goal_id)
        assert status is not None and status.stopped == "cancelled"
        of_goal = [s.event for s in await watch.caught_up() if isinstance(s.event, LLMCallRecorded) and s.event.goal_id == goal.goal_id]
        # Still drained and still as many calls: no task stepped on after parking.
        assert await uncommitted(settings.kafka, agents, agent_topics) == 0
        again = [s.event for s in await watch.caught_up() if isinstance(s.event, LLMCallRecorded) and s.event.goal_id == goal.goal_id]
        shown = json.loads((await switchboard(settings, "goal", "status", goal.goal_id, "--tenant", "acme", "--json")).stdout)
        # The goal is over: a resume is refused, with the reason.
        refused = await switchboard(settings, "goal", "resume", goal.goal_id, "--tenant", "acme", exit_code=1)

    assert len(again) == len(of_goal) == status.spent["steps"]  # every call the goal paid for, and no more
    after_cancel = [r for r in of_goal if r.ts > announced.ts]
    assert len(after_cancel) <= len(planned)  # at most the call each task had in flight
    assert (announced.from_state, announced.to_state, announced.requested_by, announced.reason) == (
        "running", "cancelled", "ops@test", "enough",
    )
    assert shown["state"] == "cancelled"
    assert {task["status"] for task in shown["tasks"]} == {"assigned"}  # none finished, none failed
    assert "goal g-cancel is cancelled; it cannot be resumed" in refused.output


async def test_a_paused_and_resumed_goal_ends_as_an_uninterrupted_one_with_its_note_saved_once(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The research task that computes 12*7 waits for the tools executor, which starts only once the
    # goal is paused (the one that only searches the knowledge base finishes first), so the pause
    # lands between the tasks. No recall, so that the first goal's memories do not reach the second.
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    keys = RedisKeys(settings.platform.namespace)
    text = "What is 12*7 and what is Apache Kafka?"
    goal = GoalSubmitted(tenant="default", goal_id="g-paused", text=text)
    straight = GoalSubmitted(tenant="default", goal_id="g-straight", text=text)  # the knowledge base is the tenant's
    core = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("agent", {"kind": "writer"}), ServiceSpec("memory")]

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(serving(core, settings))
        watch = await stack.enter_async_context(TopicWatch(settings.kafka, t.work_topics()))
        send = await stack.enter_async_context(RawProducer(settings.kafka))
        await send.event(t.goals, goal)
        [first] = await watch.events(TaskCompleted, 1, goal_id=goal.goal_id, timeout=90)
        result = await switchboard(settings, "goal", "pause", goal.goal_id, "--by", "ops@test")
        assert f"goal {goal.goal_id} is paused (was running)" in result.output
        assigned = await watch.events(TaskAssigned, 2, goal_id=goal.goal_id)
        [waiting] = [a.task_id for a in assigned if a.task_id != first.task_id]

        await stack.enter_async_context(serving([ServiceSpec("tools")], settings))

        async def parked() -> bool:
            return await checkpoint_status(redis, keys, goal.tenant, waiting) == "cancelled"

        await eventually(parked, timeout=90)  # its tool results came back; its next step was refused
        shown = json.loads((await switchboard(settings, "goal", "status", goal.goal_id, "--json")).stdout)
        assert shown["state"] == "paused"
        assert sorted(task["status"] for task in shown["tasks"]) == ["assigned", "completed", "pending"]
        paused_again = await switchboard(settings, "goal", "pause", goal.goal_id, exit_code=1)
        assert "goal g-paused is paused; it cannot be paused" in paused_again.output

        await switchboard(settings, "goal", "resume", goal.goal_id)
        done = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=90)
        await send.event(t.goals, straight)
        uninterrupted = await watch.event(GoalCompleted, goal_id=straight.goal_id, timeout=90)
        await watch.caught_up()

    assert done.answer == uninterrupted.answer
    assert "84" in done.answer and "distributed event log" in done.answer
    assert done.task_results == uninterrupted.task_results
    [resumed] = [s.event for s in watch.seen if isinstance(s.event, TaskAssigned) and s.event.resume]
    assert resumed.task_id == waiting  # continued from its checkpoint; the finished task was not redone
    saved = [json.loads(line) for line in (tmp_path / "sandbox" / goal.tenant / "notes.jsonl").read_text().splitlines()]
    assert sorted(n["goal_id"] for n in saved) == [goal.goal_id, straight.goal_id], "each goal's note saved exactly once"
    changes = [(s.event.from_state, s.event.to_state) for s in watch.seen if isinstance(s.event, GoalStateChanged)]
    assert changes == [("running", "paused"), ("paused", "running")]
