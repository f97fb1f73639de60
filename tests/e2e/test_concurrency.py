"""Many tasks in flight per replica, as separate processes: crash and scale-out lose nothing."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from schemas.events import GoalCompleted, GoalSubmitted, LLMCallRecorded
from schemas.topics import Topics
from tests.support.deployment import Deployment, make_deployment
from tests.support.kafka import RawProducer, TopicWatch, eventually

KINDS = ("researcher", "writer")
IN_FLIGHT = re.compile(r"agent\.researcher: (\d+) in flight")


def goal(i: int) -> GoalSubmitted:
    return GoalSubmitted(tenant="default", goal_id=f"g-{i}", text=f"What is {i}*3 and what is {i}+4")


def notes_per_goal(root: Path) -> dict[str, int]:
    path = root / "data" / "sandbox" / "default" / "notes.jsonl"
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        goal_id = json.loads(line)["goal_id"]
        counts[goal_id] = counts.get(goal_id, 0) + 1
    return counts


def peak_in_flight(d: Deployment, name: str) -> int:
    return max((int(n) for n in IN_FLIGHT.findall(d.log(name).read_text())), default=0)


def start_rest(d: Deployment) -> None:
    d.start("orchestrator", "orchestrator")
    d.start("writer", "agent", "--kind", "writer")
    d.start("tools", "tools")
    d.start("memory", "memory")


def test_a_replica_killed_with_hundreds_in_flight_skips_nothing(tmp_path: Path) -> None:
    d = make_deployment(tmp_path, partitions=3, SWITCHBOARD_STATUS_INTERVAL_S="0.3")
    slow = {"LLM_OFFLINE_LATENCY_MS": "uniform:1000:3000"}  # completions come back out of order
    start_rest(d)
    d.start("researcher-1", "agent", "--kind", "researcher", **slow)
    goals = [goal(i) for i in range(100)]
    try:
        d.wait_for_members({"orchestrator": 1, "agent.researcher": 1, "agent.writer": 1, "tools": 1, "memory": 1})
        t = Topics(d.namespace, KINDS)

        async def run() -> list[GoalCompleted]:
            async with TopicWatch(d.kafka, [t.progress]) as watch, RawProducer(d.kafka) as send:
                for g in goals:
                    await send.event(t.goals, g)
                await eventually(lambda: peak_in_flight(d, "researcher-1") >= 150, timeout=120, interval=0.1)
                d.kill("researcher-1")
                d.start("researcher-2", "agent", "--kind", "researcher", **slow)
                return [await watch.event(GoalCompleted, goal_id=g.goal_id, timeout=240) for g in goals]

        done = asyncio.run(run())
        assert peak_in_flight(d, "researcher-1") >= 150
        for i, completed in enumerate(done):
            assert f"{i}*3 = {i * 3}" in completed.answer and f"{i}+4 = {i + 4}" in completed.answer
        assert notes_per_goal(tmp_path) == {g.goal_id: 1 for g in goals}, "every side effect exactly once"
    finally:
        d.stop()


def test_a_replica_added_mid_run_takes_over_work_and_effects_stay_exactly_once(tmp_path: Path) -> None:
    d = make_deployment(tmp_path, partitions=4)
    slow = {"LLM_OFFLINE_LATENCY_MS": "uniform:300:900"}
    start_rest(d)
    d.start("researcher-1", "agent", "--kind", "researcher", **slow)
    goals = [goal(i) for i in range(60)]
    try:
        d.wait_for_members({"orchestrator": 1, "agent.researcher": 1, "agent.writer": 1, "tools": 1, "memory": 1})
        t = Topics(d.namespace, KINDS)

        async def run() -> tuple[int, list[LLMCallRecorded]]:
            async with TopicWatch(d.kafka, [t.progress, t.llm_calls]) as watch, RawProducer(d.kafka) as send:
                for g in goals[:30]:
                    await send.event(t.goals, g)
                await watch.events(GoalCompleted, 5, timeout=120)
                joined_at = len(watch.seen)
                d.start("researcher-2", "agent", "--kind", "researcher", **slow)
                await d.members_settled({"agent.researcher": 2})
                for g in goals[30:]:
                    await send.event(t.goals, g)
                for g in goals:
                    await watch.event(GoalCompleted, goal_id=g.goal_id, timeout=240)
                later = [s.event for s in watch.seen[joined_at:] if isinstance(s.event, LLMCallRecorded)]
                return joined_at, later

        _, later = asyncio.run(run())
        instances = {c.instance for c in later if c.agent == "researcher"}
        assert len(instances) == 2, f"both replicas made researcher calls after the second joined: {instances}"
        assert notes_per_goal(tmp_path) == {g.goal_id: 1 for g in goals}, "every side effect exactly once"
    finally:
        d.stop()
