"""`make bench`: the platform's per-step overhead and goal throughput on the real local Kafka and Redis.

Speed is measured here, never asserted in tests. Every number is printed beside a baseline
measured in the same run on the same machine: a raw aiokafka consume -> produce -> commit hop.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faststream import TestApp
from rich.console import Console
from rich.table import Table

from schemas.events import GoalCompleted, GoalSubmitted, TaskAssigned, ToolCallCompleted, ToolCallRequested
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings, kafka_app
from services.runtime.kafka_bus import ensure_topics
from services.runtime.settings import KafkaSettings, LLMSettings, PlatformSettings, QdrantSettings, RedisSettings
from tests.support.kafka import RawProducer, TopicWatch, unique

STANDARD_GOAL = "What is 12*7 and what is 3+4?"  # 3 tasks (2 research, 1 writing), 2 tool calls each
HOPS = int(os.environ.get("BENCH_HOPS", "300"))
GOALS = int(os.environ.get("BENCH_GOALS", "40"))
console = Console(width=140)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_hops(send: Callable[[int], Awaitable[None]], received: asyncio.Queue[int], n: int) -> list[float]:
    """Latency of n sequential request -> reply hops, in milliseconds (after a warm-up)."""
    latencies = []
    for i in range(-20, n):
        started = time.perf_counter()
        await send(i)
        while await received.get() != i:
            pass
        if i >= 0:
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def raw_baseline(kafka: KafkaSettings, n: int) -> list[float]:
    """aiokafka alone: consume from A, produce to B, commit; the driver waits for B."""
    ns = unique("bench-raw")
    a, b = f"{ns}.a", f"{ns}.b"
    await ensure_topics(kafka, [a, b], 3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.require(), enable_idempotence=True)
    echo = AIOKafkaConsumer(a, bootstrap_servers=kafka.require(), group_id=f"{ns}.echo", enable_auto_commit=False, auto_offset_reset="earliest")
    reader = AIOKafkaConsumer(bootstrap_servers=kafka.require(), group_id=None, enable_auto_commit=False)
    await producer.start()
    await echo.start()
    await reader.start()
    reader.assign([TopicPartition(b, p) for p in range(3)])
    await reader.seek_to_beginning()
    received: asyncio.Queue[int] = asyncio.Queue()

    async def run_echo() -> None:
        async for record in echo:
            await producer.send_and_wait(b, record.value, key=record.key)
            await echo.commit({TopicPartition(record.topic, record.partition): record.offset + 1})

    async def run_reader() -> None:
        async for record in reader:
            received.put_nowait(int(record.value))

    tasks = [asyncio.create_task(run_echo()), asyncio.create_task(run_reader())]
    try:
        return await timed_hops(lambda i: producer.send_and_wait(a, str(i).encode(), key=str(i).encode()), received, n)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (echo, reader):
            await client.stop()
        await producer.stop()


def bench_settings(kafka: KafkaSettings, redis: str, data: Path, **llm: float) -> Settings:
    return Settings(
        platform=PlatformSettings(namespace=unique("bench"), data_dir=data, partitions=3, log_level="WARNING"),
        kafka=KafkaSettings(bootstrap_servers=kafka.bootstrap_servers),
        redis=RedisSettings(url=redis),
        qdrant=QdrantSettings(path=":memory:"),
        llm=LLMSettings(**llm),
    )


async def platform_hops(settings: Settings, spec: ServiceSpec, n: int, request: Callable[[int, Topics], tuple[str, object]], reply: type) -> list[float]:
    """Sequential hops through one platform service, measured the same way as the raw baseline."""
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    received: asyncio.Queue[int] = asyncio.Queue()
    async with TestApp(kafka_app([spec], settings)), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:

        async def read() -> None:
            while True:
                before = len(watch.seen)
                await watch._poll()
                for seen in watch.seen[before:]:
                    if isinstance(seen.event, reply):
                        received.put_nowait(int((seen.event.task_id or "x.-1").rsplit(".", 1)[1]))

        reader = asyncio.create_task(read())

        async def send_one(i: int) -> None:
            topic, event = request(i, t)
            await send.event(topic, event)  # type: ignore[arg-type]

        try:
            return await timed_hops(send_one, received, n)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def tool_request(i: int, t: Topics) -> tuple[str, ToolCallRequested]:
    return t.tools, ToolCallRequested(
        tenant="bench", goal_id="g", task_id=f"g.{i}", call_id=f"c{i}", step_id=f"g.{i}:0", tool="calculator",
        arguments={"expression": f"{i}*7"}, agent_kind="researcher", reply_to=t.agent("researcher"),
    )


def task_request(i: int, t: Topics) -> tuple[str, TaskAssigned]:
    return t.agent("researcher"), TaskAssigned(
        tenant="bench", goal_id="g", task_id=f"g.{i}", kind="researcher", instruction=f"What is {i}*7", goal_text="bench",
    )


async def goal_throughput(settings: Settings, goals: int) -> tuple[float, float, int]:
    """Goals/s and steps/s for the standard goal, every service in one process on Kafka."""
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    specs = [ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("agent", {"kind": "writer"}), ServiceSpec("tools"), ServiceSpec("memory")]
    async with TestApp(kafka_app(specs, settings)), TopicWatch(settings.kafka, [t.progress, t.llm_calls]) as watch, RawProducer(settings.kafka) as send:
        warm = GoalSubmitted(tenant="bench", goal_id="g-warm", text=STANDARD_GOAL)
        await send.event(t.goals, warm)
        await watch.event(GoalCompleted, goal_id="g-warm", timeout=120)
        started = time.perf_counter()
        for i in range(goals):
            await send.event(t.goals, GoalSubmitted(tenant="bench", goal_id=f"g-{i}", text=STANDARD_GOAL))
        await watch.wait_for(lambda s: isinstance(s.event, GoalCompleted) and s.event.goal_id != "g-warm", count=goals, timeout=600)
        elapsed = time.perf_counter() - started
        steps = sum(1 for s in watch.seen if s.topic == t.llm_calls and s.event and s.event.goal_id != "g-warm")
    return goals / elapsed, steps / elapsed, steps


async def main() -> None:
    kafka = KafkaSettings()
    redis = RedisSettings().url
    if not kafka.bootstrap_servers or not redis:
        raise SystemExit("make bench starts the local Kafka and Redis; set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL to run it by hand")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        console.print(f"[dim]raw aiokafka baseline: {HOPS} sequential hops…[/]")
        raw = await raw_baseline(kafka, HOPS)
        console.print("[dim]tool executor step…[/]")
        tool = await platform_hops(bench_settings(kafka, redis, data), ServiceSpec("tools"), HOPS, tool_request, ToolCallCompleted)
        console.print("[dim]agent step (checkpoint + LLM gateway, model latency 0)…[/]")
        os.environ["AGENT_RECALL_K"] = "0"  # the agent goes straight to its model call
        agent = await platform_hops(bench_settings(kafka, redis, data), ServiceSpec("agent", {"kind": "researcher"}), HOPS, task_request, ToolCallRequested)
        del os.environ["AGENT_RECALL_K"]
        console.print(f"[dim]{GOALS} standard goals, every service in one process…[/]")
        goals_s, steps_s, steps = await goal_throughput(bench_settings(kafka, redis, data), GOALS)

    raw50, raw99 = percentile(raw, 0.5), percentile(raw, 0.99)
    table = Table(title="Switchboard on local Kafka + Redis, offline model at 0 ms (same run, same machine)")
    for column in ("measure", "p50 ms", "p99 ms", "p50 / raw", "p99 / raw", "overhead p50 ms", "overhead p99 ms"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row("raw aiokafka hop", f"{raw50:.2f}", f"{raw99:.2f}", "1.00", "1.00", "-", "-")
    for name, values in (("tool executor step", tool), ("agent step", agent)):
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        table.add_row(name, f"{p50:.2f}", f"{p99:.2f}", f"{p50 / raw50:.2f}", f"{p99 / raw99:.2f}", f"{p50 - raw50:.2f}", f"{p99 - raw99:.2f}")
    console.print(table)
    console.print(
        "raw aiokafka hop: consume, produce, commit. tool executor step: the same hop through the platform "
        "(decode, validate, allowlist, calculator, produce, commit). agent step: task assignment -> checkpoint "
        "in Redis -> model call through the LiteLLM gateway -> tool requests produced -> commit."
    )
    console.print(
        f"standard goal ({STANDARD_GOAL!r}: 3 tasks, 2 tool calls each), {GOALS} goals submitted at once: "
        f"[bold]{goals_s:.2f} goals/s[/], {steps_s:.1f} model steps/s ({steps} steps). "
        f"Raw hop throughput for comparison: {1000 / statistics.mean(raw):.0f} sequential hops/s."
    )


if __name__ == "__main__":
    asyncio.run(main())
