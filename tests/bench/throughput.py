"""Goal throughput of whole replicas (`switchboard serve all` processes) under model latency.

Each configuration gets its own namespace, so its own topics and consumer groups; its topics and
Redis keys are deleted afterwards (the broker may be shared).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.events import GoalCompleted, GoalSubmitted
from schemas.topics import Topics
from tests.bench.cache import clean_up
from tests.support.deployment import make_deployment
from tests.support.kafka import RawProducer, TopicWatch

STANDARD_GOAL = "What is 12*7 and what is 3+4?"  # 3 tasks (2 research, 1 writing), 2 tool calls each
GROUPS = ("orchestrator", "agent.researcher", "agent.writer", "tools", "memory", "memory-recorder")


@dataclass(frozen=True)
class Throughput:
    latency: str
    in_flight: int
    replicas: int
    goals: int
    seconds: float
    model_calls: int
    rss_mb: list[float]

    @property
    def goals_per_s(self) -> float:
        return self.goals / self.seconds

    @property
    def steps_per_s(self) -> float:
        return self.model_calls / self.seconds


def peak_rss_mb(pid: int) -> float:
    """The process's resident-memory high-water mark (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


async def measure(root: Path, latency: str, in_flight: int, replicas: int, goals: int) -> Throughput:
    root.mkdir(parents=True, exist_ok=True)
    d = make_deployment(
        root, partitions=6, SWITCHBOARD_MAX_IN_FLIGHT=str(in_flight), LLM_OFFLINE_LATENCY_MS=latency,
        SWITCHBOARD_LOG_LEVEL="WARNING",
    )
    for r in range(replicas):
        # Qdrant local mode allows one process per path: each replica gets its own.
        d.start(f"replica-{r}", "all", QDRANT_PATH=str(root / f"qdrant-{r}"))
    try:
        await d.members_settled({group: replicas for group in GROUPS}, timeout=180)
        t = Topics(d.namespace, ("researcher", "writer"))
        async with TopicWatch(d.kafka, [t.progress, t.llm_calls]) as watch, RawProducer(d.kafka) as send:
            await send.event(t.goals, GoalSubmitted(tenant="default", goal_id="g-warm", text=STANDARD_GOAL))
            await watch.event(GoalCompleted, goal_id="g-warm", timeout=120)
            started = time.perf_counter()
            for i in range(goals):
                await send.event(t.goals, GoalSubmitted(tenant="default", goal_id=f"g-{i}", text=STANDARD_GOAL))
            await watch.wait_for(
                lambda s: isinstance(s.event, GoalCompleted) and s.event.goal_id != "g-warm", count=goals, timeout=900
            )
            seconds = time.perf_counter() - started
            calls = sum(1 for s in watch.seen if s.topic == t.llm_calls and s.event and s.event.goal_id != "g-warm")
        d.assert_alive()
        rss = [peak_rss_mb(p.pid) for p in d.processes.values()]
        return Throughput(latency, in_flight, replicas, goals, seconds, calls, rss)
    finally:
        d.stop()
        await clean_up(d, d.env["REDIS_URL"])
