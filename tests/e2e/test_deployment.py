"""The walking skeleton as a user runs it: separate processes, a goal submitted through the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from schemas.events import GoalCompleted, GoalSubmitted, LLMCallRecorded
from schemas.topics import Topics
from tests.support.deployment import Deployment, make_deployment
from tests.support.kafka import RawProducer, TopicWatch, eventually

KINDS = ("researcher", "writer")


def test_a_goal_submitted_through_the_cli_completes_with_its_answer(deployment: Deployment) -> None:
    result = deployment.cli("goal", "submit", "What is 12*7 and what is Apache Kafka?", "--follow", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "plan" in out and "calls calculator" in out and "calls save_note" in out
    answer = out.split("final answer", 1)[1]
    assert "12*7 = 84" in answer and "distributed event log" in answer


def test_two_replicas_of_one_agent_kind_share_the_tasks_of_one_run(deployment: Deployment) -> None:
    t = Topics(deployment.namespace, KINDS)
    goals = [
        GoalSubmitted(tenant="default", goal_id=f"g-share-{i}", text=f"What is {i}*3 and what is {i}+4 and what is Redis")
        for i in range(6)
    ]

    async def run() -> list[LLMCallRecorded]:
        async with TopicWatch(deployment.kafka, [t.progress, t.llm_calls]) as watch, RawProducer(deployment.kafka) as send:
            for goal in goals:
                await send.event(t.goals, goal)
            for goal in goals:
                await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=120)
            return [s.event for s in watch.seen if isinstance(s.event, LLMCallRecorded) and s.event.goal_id.startswith("g-share-")]

    calls = asyncio.run(run())
    researcher_replicas = {c.instance for c in calls if c.agent == "researcher"}
    assert len(researcher_replicas) == 2, researcher_replicas


def test_malformed_and_schema_invalid_goals_are_dead_lettered_while_valid_goals_complete(deployment: Deployment) -> None:
    t = Topics(deployment.namespace, KINDS)
    valid = [GoalSubmitted(tenant="default", goal_id=f"g-mixed-{i}", text=f"What is {i}+{i}") for i in range(3)]

    async def run() -> tuple[dict[str, str], list[GoalCompleted]]:
        async with TopicWatch(deployment.kafka, [t.progress, Topics.dlq(t.goals)]) as watch, RawProducer(deployment.kafka) as send:
            await send.event(t.goals, valid[0], key="mixed")
            await send.send(t.goals, b"{not json at all", key="mixed")
            await send.event(t.goals, valid[1], key="mixed")
            await send.send(t.goals, json.dumps({"event_type": "goal.submitted", "goal_id": "g-bad", "tenant": "default"}).encode(), key="mixed")
            await send.event(t.goals, valid[2], key="mixed")
            done = [await watch.event(GoalCompleted, goal_id=g.goal_id, timeout=120) for g in valid]
            for reason in ("poison", "schema_invalid"):
                await watch.wait_for(lambda s: s.topic == Topics.dlq(t.goals) and s.headers["x-dlq-reason"] == reason)
            # At-least-once: a redelivered bad message may be dead-lettered again; key by its offset.
            dead = {s.headers["x-dlq-original-offset"]: s.headers for s in watch.seen if s.topic == Topics.dlq(t.goals)}
            return {h["x-dlq-reason"]: h["x-dlq-consumer-group"] for h in dead.values()}, done

    dead, done = asyncio.run(run())
    orchestrator = f"{deployment.namespace}.orchestrator"
    assert dead == {"poison": orchestrator, "schema_invalid": orchestrator}
    assert [d.answer for d in done] == ["[r1] What is 0+0: 0+0 = 0", "[r1] What is 1+1: 1+1 = 2", "[r1] What is 2+2: 2+2 = 4"]


def test_a_replica_killed_mid_task_loses_nothing_and_the_side_effect_runs_once(tmp_path: Path) -> None:
    d = make_deployment(tmp_path)
    slow = {"LLM_OFFLINE_LATENCY_MS": "2500"}
    d.start("orchestrator", "orchestrator")
    d.start("researcher", "agent", "--kind", "researcher")
    d.start("writer-1", "agent", "--kind", "writer", **slow)
    d.start("writer-2", "agent", "--kind", "writer", **slow)
    d.start("tools", "tools")
    d.start("memory", "memory")
    try:
        d.wait_for_members({"orchestrator": 1, "agent.researcher": 1, "agent.writer": 2, "tools": 1, "memory": 1})
        t = Topics(d.namespace, KINDS)
        goal = GoalSubmitted(tenant="default", goal_id="g-kill", text="What is 6*7 and what is Apache Kafka?")

        def holder(marker: str) -> Callable[[], str | None]:
            def find() -> str | None:
                return next((n for n in ("writer-1", "writer-2") if marker in d.log(n).read_text()), None)
            return find

        async def run() -> tuple[str, GoalCompleted]:
            async with TopicWatch(d.kafka, [t.progress]) as watch, RawProducer(d.kafka) as send:
                await send.event(t.goals, goal)
                # The writer's second model call starts after save_note ran: kill it right there,
                # while it holds the task's in-flight step, uncommitted.
                victim = await eventually(holder("step g-kill.w1:1: calling"), timeout=120)
                d.kill(victim)
                done = await watch.event(GoalCompleted, goal_id="g-kill", timeout=180)
                return victim, done

        victim, done = asyncio.run(run())
        survivor = "writer-2" if victim == "writer-1" else "writer-1"
        assert "step g-kill.w1:1: calling" in d.log(survivor).read_text(), "the other replica resumed the task"
        assert "6*7 = 42" in done.answer
        notes = (tmp_path / "data" / "sandbox" / "default" / "notes.jsonl").read_text().splitlines()
        assert [json.loads(n)["goal_id"] for n in notes] == ["g-kill"]
    finally:
        d.stop()
