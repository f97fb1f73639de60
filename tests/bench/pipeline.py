"""`make bench`: per-step overhead, goal throughput, memory and the response cache's savings on the
real local Kafka and Redis.

Speed is measured here, never asserted in tests. Every number is printed beside a baseline
measured in the same run on the same machine: a raw aiokafka consume -> produce -> commit hop.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faststream import TestApp
from rich.console import Console
from rich.table import Table

from schemas.events import TaskAssigned, ToolCallCompleted, ToolCallRequested
from schemas.topics import Topics
from services.runtime.host import ServiceSpec, Settings, kafka_app
from services.runtime.kafka_bus import ensure_topics
from services.runtime.settings import KafkaSettings, LLMSettings, PlatformSettings, QdrantSettings, RedisSettings
from tests.bench import cache
from tests.bench.stats import percentile
from tests.bench.throughput import STANDARD_GOAL, measure
from tests.support.kafka import RawProducer, TopicWatch, drop_namespace_topics, unique

HOPS = int(os.environ.get("BENCH_HOPS", "300"))
CACHE = os.environ.get("BENCH_CACHE", "1") != "0"  # BENCH_CACHE=0 skips the response-cache workload
# BENCH_ONLY=0/256,500/256 limits the matrix to those (latency/in-flight) pairs, for a quick look.
ONLY = {tuple(p.split("/")) for p in os.environ.get("BENCH_ONLY", "").split(",") if p}
ONLY = {(lat, int(inf)) for lat, inf in ONLY}
console = Console(width=140)


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


async def raw_baseline(kafka: KafkaSettings, n: int) -> tuple[list[float], float]:
    """aiokafka alone: consume from A, produce to B, commit; the driver waits for B.

    Returns the latencies of n sequential round trips (ms), and the throughput (messages/s) of
    n * 10 messages sent at once.
    """
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

    done: dict[TopicPartition, int] = {}

    async def run_echo() -> None:
        # The best a plain aiokafka service does: produce a fetched batch at once and wait for the
        # acks; offsets are committed in the background, as the platform does. The ceiling.
        while True:
            batch = await echo.getmany(timeout_ms=200)
            sends = [await producer.send(b, r.value, key=r.key) for records in batch.values() for r in records]
            await asyncio.gather(*sends)
            done.update({tp: records[-1].offset + 1 for tp, records in batch.items()})

    async def run_committer() -> None:
        while True:
            await asyncio.sleep(0.1)  # the same commit interval as the platform's default
            if done:
                offsets = dict(done)
                done.clear()
                await echo.commit(offsets)

    async def run_reader() -> None:
        while True:
            for records in (await reader.getmany(timeout_ms=200)).values():
                for record in records:
                    received.put_nowait(int(record.value))

    tasks = [asyncio.create_task(run_echo()), asyncio.create_task(run_reader()), asyncio.create_task(run_committer())]
    try:
        latencies = await timed_hops(lambda i: producer.send_and_wait(a, str(i).encode(), key=str(i).encode()), received, n)
        burst = n * 10
        started = time.perf_counter()
        sends = [await producer.send(a, str(n + i).encode(), key=str(i).encode()) for i in range(burst)]
        await asyncio.gather(*sends)
        for _ in range(burst):
            await received.get()
        return latencies, burst / (time.perf_counter() - started)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (echo, reader):
            await client.stop()
        await producer.stop()
        await drop_namespace_topics(kafka, ns)


def bench_settings(kafka: KafkaSettings, redis: str, data: Path, **llm: float) -> Settings:
    return Settings(
        platform=PlatformSettings(namespace=unique("bench"), data_dir=data, partitions=3, log_level="WARNING"),
        kafka=KafkaSettings(bootstrap_servers=kafka.bootstrap_servers),
        redis=RedisSettings(url=redis),
        qdrant=QdrantSettings(path=":memory:"),
        llm=LLMSettings(**llm),
    )


async def platform_hops(settings: Settings, spec: ServiceSpec, n: int, request: Callable[[int, Topics], tuple[str, object]], reply: type) -> list[float]:
    """Sequential hops through one platform service, measured the same way as the raw baseline; its
    topics are deleted afterwards (the broker may be shared)."""
    try:
        return await _hops(settings, spec, n, request, reply)
    finally:
        await drop_namespace_topics(settings.kafka, settings.platform.namespace)


async def _hops(settings: Settings, spec: ServiceSpec, n: int, request: Callable[[int, Topics], tuple[str, object]], reply: type) -> list[float]:
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
            await send.event(topic, event, signed=True)  # type: ignore[arg-type]  # plays the agent

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


MATRIX = [
    # (model latency, in-flight limit, replicas, goals submitted at once)
    (latency, in_flight, replicas, goals)
    for latency, sizes in (("0", {1: 10, 16: 40, 256: 150}), ("500", {1: 4, 16: 32, 256: 150}))
    for in_flight, goals in sizes.items()
    for replicas in (1, 2)
]


async def main() -> None:
    kafka = KafkaSettings()
    redis = RedisSettings().url
    if not kafka.bootstrap_servers or not redis:
        raise SystemExit("make bench starts the local Kafka and Redis; set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL to run it by hand")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        console.print(f"[dim]raw aiokafka baseline: {HOPS} sequential round trips, then {HOPS * 10} at once…[/]")
        raw, raw_rate = await raw_baseline(kafka, HOPS)
        console.print("[dim]tool executor step…[/]")
        tool = await platform_hops(bench_settings(kafka, redis, data), ServiceSpec("tools"), HOPS, tool_request, ToolCallCompleted)
        console.print("[dim]agent step (checkpoint + LLM gateway, model latency 0)…[/]")
        os.environ["AGENT_RECALL_K"] = "0"  # the agent goes straight to its model call
        agent = await platform_hops(bench_settings(kafka, redis, data), ServiceSpec("agent", {"kind": "researcher"}), HOPS, task_request, ToolCallRequested)
        del os.environ["AGENT_RECALL_K"]
        runs = []
        for n, (latency, in_flight, replicas, goals) in enumerate(MATRIX):
            if ONLY and (latency, in_flight) not in ONLY:
                continue
            console.print(f"[dim]{goals} standard goals, model {latency} ms, {in_flight} in flight, {replicas} replica(s)…[/]")
            runs.append(await measure(data / f"run-{n}", latency, in_flight, replicas, goals))
        cached = await cache.measure_cache(data / "cache", console) if CACHE else None

    raw50, raw99 = percentile(raw, 0.5), percentile(raw, 0.99)
    table = Table(title="Switchboard on the local Kafka + Redis, offline model (one run, one machine)")
    for column in ("measure", "setting", "result", "vs raw aiokafka", "target"):
        table.add_column(column)
    table.add_row("raw aiokafka round trip", "produce→consume→produce, sequential", f"p50 {raw50:.2f} ms, p99 {raw99:.2f} ms", "baseline", "")
    table.add_row("raw aiokafka throughput", f"{HOPS * 10} messages at once", f"{raw_rate:,.0f} msg/s", "baseline", "")
    for name, values in (("tool executor step", tool), ("agent step", agent)):
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        table.add_row(
            name, "model latency 0, sequential",
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms; overhead p50 {p50 - raw50:+.2f}, p99 {p99 - raw99:+.2f} ms",
            f"×{p50 / raw50:.2f} p50, ×{p99 / raw99:.2f} p99",
            "overhead p99 ≤ 10 ms",
        )
    for run in runs:
        target = "≥ 300 steps/s" if (run.latency, run.in_flight, run.replicas) == ("500", 256, 1) else ""
        table.add_row(
            "standard goal throughput",
            f"model {run.latency} ms, {run.in_flight} in flight, {run.replicas} replica(s), {run.goals} goals",
            f"{run.goals_per_s:.2f} goals/s, {run.steps_per_s:.1f} model steps/s",
            "-",
            target,
        )
    for run in runs:
        if run.in_flight == 256 and run.latency == "500":
            table.add_row(
                "resident memory per replica", f"{run.in_flight} in flight, {run.replicas} replica(s)",
                ", ".join(f"{mb:.0f} MiB" for mb in run.rss_mb), "-", "",
            )
    console.print(table)
    console.print(
        "A round trip and a step are each measured the same way: send one request, wait for its reply. The agent "
        "step is task assignment -> checkpoint in Redis -> model call through the LiteLLM gateway -> tool requests "
        "produced -> commit. The standard goal is " + repr(STANDARD_GOAL) + ": 3 tasks, 2 tool calls each, 8 model "
        "calls in all (plan, 2 per task, answer). Replicas are `switchboard serve all` processes."
    )
    if cached is not None:
        console.print()
        cache.report(console, *cached)


if __name__ == "__main__":
    asyncio.run(main())
