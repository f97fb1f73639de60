"""Each service's handler chain on the real broker: the test plays every other service."""

from __future__ import annotations

import json
from pathlib import Path

from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.events import (
    GoalCompleted,
    GoalPlanned,
    GoalSubmitted,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, TopicWatch


def topics_of(settings: Settings) -> Topics:
    return Topics(settings.platform.namespace, ("researcher", "writer"))


async def test_orchestrator_plans_dispatches_and_answers_through_kafka(settings: Settings) -> None:
    t = topics_of(settings)
    goal = GoalSubmitted(tenant="acme", goal_id="g-orch", text="What is 2+2 and what is Redis?")
    async with serving([ServiceSpec("orchestrator")], settings), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        planned = await watch.event(GoalPlanned, goal_id="g-orch")
        assert [task.id for task in planned.plan.tasks] == ["r1", "r2", "w1"]
        research = await watch.events(TaskAssigned, 2, kind="researcher")
        assert {r.task_id for r in research} == {"g-orch.r1", "g-orch.r2"}
        for r in research:
            await send.event(t.goals, TaskCompleted(**r.caused(), kind="researcher", result=f"found {r.task_id}", steps=1), key=r.goal_id)
        writer = await watch.event(TaskAssigned, kind="writer")
        assert writer.inputs == {"r1": "found g-orch.r1", "r2": "found g-orch.r2"}
        await send.event(t.goals, TaskCompleted(**writer.caused(), kind="writer", result="4, and Redis is a store", steps=1), key=writer.goal_id)
        done = await watch.event(GoalCompleted, goal_id="g-orch")
        assert done.answer == "4, and Redis is a store"


async def test_agent_steps_through_recall_tools_and_answer_with_its_checkpoint_in_redis(settings: Settings, redis: Redis) -> None:
    t = topics_of(settings)
    task = TaskAssigned(tenant="acme", goal_id="g-agent", task_id="g-agent.r1", kind="researcher", instruction="What is 12*7", goal_text="What is 12*7")
    async with serving([ServiceSpec("agent", {"kind": "researcher"})], settings), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.agent("researcher"), task)
        recall = await watch.event(MemoryRecallRequested, task_id="g-agent.r1")
        await send.event(t.agent("researcher"), MemoryRecallCompleted(**recall.caused(), request_id=recall.request_id, hits=[]))
        requests = await watch.events(ToolCallRequested, 2, task_id="g-agent.r1")
        on_topic = {s.event.tool: s.topic for s in watch.seen if isinstance(s.event, ToolCallRequested)}
        assert on_topic == {"calculator": t.tools, "kb_search": t.memory}
        for r in requests:
            output = "12*7 = 84" if r.tool == "calculator" else "no matching facts"
            await send.event(t.agent("researcher"), ToolCallCompleted(**r.caused(), call_id=r.call_id, step_id=r.step_id, tool=r.tool, ok=True, output=output))
        done = await watch.event(TaskCompleted, task_id="g-agent.r1")
        assert "84" in done.result
    checkpoint = json.loads(await redis.get(RedisKeys(settings.platform.namespace).task_checkpoint("acme", "g-agent.r1")))
    assert checkpoint["status"] == "done" and checkpoint["step"] == 2


async def test_tool_executor_runs_a_side_effect_once_for_a_redelivered_request(settings: Settings, tmp_path: Path) -> None:
    t = topics_of(settings)
    base = dict(tenant="acme", goal_id="g-tools", task_id="g-tools.w1", agent_kind="writer", reply_to=t.agent("writer"))
    note = ToolCallRequested(**base, call_id="c1", step_id="g-tools.w1:0", tool="save_note", arguments={"title": "t", "body": "b"})
    calc = ToolCallRequested(**{**base, "agent_kind": "researcher"}, call_id="c2", step_id="g-tools.w1:0", tool="calculator", arguments={"expression": "12*7"})
    async with serving([ServiceSpec("tools")], settings), TopicWatch(settings.kafka, [t.agent("writer")]) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.tools, calc, signed=True)
        await send.event(t.tools, note, signed=True)
        await send.event(t.tools, note, signed=True)  # the same request again, as after a crash before commit
        results = await watch.events(ToolCallCompleted, 3)
    by_call = {(r.call_id, r.replayed): r for r in results}
    assert by_call[("c2", False)].output == "12*7 = 84"
    assert by_call[("c1", False)].ok and by_call[("c1", True)].ok
    notes = (tmp_path / "sandbox" / "acme" / "notes.jsonl").read_text().splitlines()
    assert len(notes) == 1


async def test_memory_service_recalls_facts_and_records_every_goal_event(settings: Settings, redis: Redis) -> None:
    t = topics_of(settings)
    keys = RedisKeys(settings.platform.namespace)
    async with serving([ServiceSpec("memory")], settings), TopicWatch(settings.kafka, [t.agent("researcher")]) as watch, RawProducer(settings.kafka) as send:
        ask = MemoryRecallRequested(tenant="default", goal_id="g-mem", task_id="g-mem.r1", request_id="q1", query="what is Apache Kafka", k=2, reply_to=t.agent("researcher"))
        await send.event(t.memory, ask)
        recalled = await watch.event(MemoryRecallCompleted, request_id="q1")
        assert "distributed event log" in recalled.hits[0].text

        outcome = TaskCompleted(tenant="default", goal_id="g-mem", task_id="g-mem.r1", kind="researcher", result="The answer to the ultimate question is 42", steps=1)
        await send.event(t.goals, outcome, key="g-mem")
        stream = keys.goal_stream("default", "g-mem")
        expected = {"memory.recall_requested", "memory.recall_completed", "task.completed"}
        recorded: set[str] = set()
        last = "0"
        while recorded != expected:
            # XREAD BLOCK waits for the recorder's next write; it records every event of the goal.
            [[_, entries]] = await redis.xread({stream: last}, count=10, block=30_000) or [[None, []]]
            assert entries, f"recorder wrote nothing new within 30s; so far {recorded}"
            last = entries[-1][0]
            recorded |= {fields[b"event_type"].decode() for _, fields in entries}
        assert await redis.ttl(stream) > 0

        await send.event(t.memory, ask.model_copy(update={"event_id": "again", "request_id": "q2", "query": "the ultimate question"}))
        again = await watch.event(MemoryRecallCompleted, request_id="q2")
        assert any(h.kind == "outcome" and "42" in h.text for h in again.hits)

        other_tenant = ask.model_copy(update={"event_id": "other", "tenant": "globex", "request_id": "q3", "query": "the ultimate question"})
        await send.event(t.memory, other_tenant)
        isolated = await watch.event(MemoryRecallCompleted, request_id="q3")
        assert isolated.hits == []


async def test_every_service_together_completes_a_goal_over_kafka(settings: Settings) -> None:
    t = topics_of(settings)
    specs = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("agent", {"kind": "writer"}), ServiceSpec("tools"), ServiceSpec("memory")]
    goal = GoalSubmitted(tenant="default", goal_id="g-all", text="What is 12*7 and what is Apache Kafka?")
    async with serving(specs, settings), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        await send.event(t.goals, goal)
        done = await watch.event(GoalCompleted, goal_id="g-all", timeout=90)
    assert "84" in done.answer and "distributed event log" in done.answer
    traced = {s.headers.get("traceparent", "").split("-")[1] for s in watch.seen if s.event and s.event.goal_id == "g-all"}
    assert len(traced) == 1, "every message of the goal carries the same trace id"
