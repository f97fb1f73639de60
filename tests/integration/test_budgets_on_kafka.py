"""Budgets on the real broker: a model that never stops is stopped within one call of its limit,
also when two replicas work on the same goal at once."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack

import pytest
from aiokafka.partitioner import murmur2
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.budget import BudgetLimits
from schemas.events import GoalFailed, GoalSubmitted, LLMCallRecorded
from schemas.topics import Topics
from services.runtime.budget import BudgetLedger, BudgetStatus
from services.runtime.host import ServiceSpec, Settings
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, Seen, TopicWatch, eventually, group_members
from tests.support.scripts import looping


@pytest.fixture(autouse=True)
def long_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_MAX_STEPS", "500")  # only the goal's budget stops these tasks
    monkeypatch.setenv("AGENT_RECALL_K", "0")


def spread_task_ids(goal_id: str, partitions: int, per_partition: int) -> list[str]:
    """Planned task ids whose tasks (keyed `<goal>.<id>`) land on every partition of a topic."""
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    n = 0
    while any(len(ids) < per_partition for ids in chosen.values()):
        n += 1
        planned = f"t{n}"
        partition = (murmur2(f"{goal_id}.{planned}".encode()) & 0x7FFFFFFF) % partitions
        if len(chosen[partition]) < per_partition:
            chosen[partition].append(planned)
    return [planned for ids in chosen.values() for planned in ids]


async def every_call_recorded(watch: TopicWatch, redis: Redis, settings: Settings, goal_id: str) -> list[LLMCallRecorded]:
    """The goal's call records, once none is in flight: one for every call the goal paid for."""
    budget = BudgetLedger(redis, RedisKeys(settings.platform.namespace), settings.budget)
    status = await eventually(lambda: _idle(budget, goal_id), timeout=90)

    def of_goal(s: Seen) -> bool:
        return isinstance(s.event, LLMCallRecorded) and s.event.goal_id == goal_id

    await watch.wait_for(of_goal, count=int(status.spent["steps"]))
    records = [s.event for s in watch.seen if of_goal(s)]
    assert len(records) == status.spent["steps"]
    assert sum(r.input_tokens + r.output_tokens for r in records) == status.spent["tokens"]
    return records


async def _idle(budget: BudgetLedger, goal_id: str) -> BudgetStatus | None:
    status = await budget.status("acme", goal_id)
    return status if status is not None and status.in_flight == 0 and status.stopped else None


async def test_a_model_that_loops_forever_is_stopped_within_one_call_of_its_token_budget(
    settings: Settings, redis: Redis
) -> None:
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    limit = 3_000
    goal = GoalSubmitted(tenant="acme", goal_id="g-runaway", text="count forever", budget=BudgetLimits(max_tokens=limit))
    script = looping(["r1"])
    services = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("tools")]
    watched = [t.progress, t.llm_calls, *t.dlq_topics()]
    async with serving(services, settings, script), TopicWatch(settings.kafka, watched) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        failed = await watch.event(GoalFailed, goal_id=goal.goal_id, timeout=120)
        dead = await watch.wait_for(lambda s: Topics.is_dlq(s.topic) and s.headers.get("x-dlq-goal-id") == goal.goal_id)
        records = await every_call_recorded(watch, redis, settings, goal.goal_id)

    spent = sum(r.input_tokens + r.output_tokens for r in records)
    last = max(records, key=lambda r: r.ts)
    assert len(records) > 5  # it did loop
    assert spent >= limit and spent - (last.input_tokens + last.output_tokens) < limit  # over by one call at most
    assert failed.reason == "budget_exceeded" and failed.figures == {"limit": limit, "spent": spent}
    [record] = [s for s in watch.seen if Topics.is_dlq(s.topic)]
    assert record is dead[0] and record.topic == Topics.dlq(t.agent("researcher"))
    assert record.headers["x-dlq-reason"] == "budget_exceeded"


async def test_two_replicas_on_one_goal_together_stay_within_one_call_of_the_token_budget(
    settings: Settings, redis: Redis
) -> None:
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    limit = 6_000
    task_ids = spread_task_ids("g-shared", settings.platform.partitions, per_partition=2)
    goal = GoalSubmitted(tenant="acme", goal_id="g-shared", text="count forever", budget=BudgetLimits(max_tokens=limit))
    script = looping(task_ids)
    replicas = [
        dataclasses.replace(settings, platform=settings.platform.model_copy(update={"instance": f"replica-{n}"}))
        for n in (1, 2)
    ]
    watched = [t.progress, t.llm_calls, *t.dlq_topics()]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(serving([ServiceSpec("orchestrator"), ServiceSpec("tools")], settings, script))
        for replica in replicas:
            await stack.enter_async_context(serving([ServiceSpec("agent", {"kind": "researcher"})], replica, script))
        group = f"{settings.platform.namespace}.agent.researcher"

        async def both_replicas_joined() -> bool:
            return await group_members(settings.kafka, group) == 2

        await eventually(both_replicas_joined, timeout=90)
        watch = await stack.enter_async_context(TopicWatch(settings.kafka, watched))
        send = await stack.enter_async_context(RawProducer(settings.kafka))
        await send.event(t.goals, goal)
        failed = await watch.event(GoalFailed, goal_id=goal.goal_id, timeout=180)
        records = await every_call_recorded(watch, redis, settings, goal.goal_id)

    by_replica = {r.instance for r in records if r.purpose == "step"}
    assert by_replica == {"replica-1", "replica-2"}  # both worked on the goal at once
    spent = sum(r.input_tokens + r.output_tokens for r in records)
    biggest = max(r.input_tokens + r.output_tokens for r in records)
    assert limit <= spent < limit + biggest
    assert failed.reason == "budget_exceeded" and failed.figures["limit"] == limit
    budget_records = [s for s in watch.seen if Topics.is_dlq(s.topic) and s.headers["x-dlq-reason"] == "budget_exceeded"]
    assert len(budget_records) == 1  # the first task over the limit; the others stopped quietly




async def test_a_long_task_sends_every_model_call_within_its_context_budget_while_its_history_outgrows_it(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    context_budget = 600
    monkeypatch.setenv("AGENT_CONTEXT_TOKENS", str(context_budget))
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    goal = GoalSubmitted(tenant="acme", goal_id="g-context", text="count on", budget=BudgetLimits(max_steps=30))
    services = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("tools")]
    watched = [t.progress, t.llm_calls, *t.dlq_topics()]
    async with serving(services, settings, looping(["r1"])), TopicWatch(settings.kafka, watched) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        failed = await watch.event(GoalFailed, goal_id=goal.goal_id, timeout=120)
        records = await every_call_recorded(watch, redis, settings, goal.goal_id)

    steps = sorted((r for r in records if r.purpose == "step"), key=lambda r: r.ts)
    assert failed.reason == "budget_exceeded" and len(steps) >= 25  # it counted on, not a runaway
    assert all(r.context_tokens is not None and r.context_tokens <= context_budget for r in steps)
    assert all(r.full_history_tokens is not None and r.full_history_tokens >= (r.context_tokens or 0) for r in steps)
    assert (steps[-1].full_history_tokens or 0) > 2 * context_budget  # what a naive context would have sent
    # What was sent is what the record counts: the messages themselves stay within the budget.
    assert max(r.input_tokens for r in steps) <= context_budget + 100  # plus the tool schemas the model is offered
