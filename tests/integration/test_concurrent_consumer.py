"""The consumption mode on the real broker: many in flight, order per key, bounded, safe on rebalance."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas.envelope import Envelope
from schemas.events import GoalSubmitted
from schemas.topics import Topics
from services.runtime.bus import Delivery, Handler, Outgoing, Subscription
from services.runtime.errors import Retryable
from services.runtime.host import Settings
from services.runtime.kafka_bus import ensure_topics, topic_partitions
from services.runtime.kafka_consumer import ConcurrentKafkaConsumer
from services.runtime.pipeline import MessagePipeline, RetryPolicy
from services.runtime.settings import KafkaSettings
from tests.support.kafka import eventually


class Producer:
    """The pipeline's Producer on a plain idempotent aiokafka producer."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.client = AIOKafkaProducer(bootstrap_servers=kafka.require(), enable_idempotence=True, linger_ms=5)

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]) -> None:
        await self.client.send_and_wait(topic, value, key=key, headers=[(k, v.encode()) for k, v in headers.items()])


class Recorder:
    """A handler that records what it processed, how many ran at once, and can be held back."""

    def __init__(self, work_ms: tuple[float, float] = (0.0, 0.0), seed: int = 1) -> None:
        self.order: dict[str, list[int]] = defaultdict(list)
        self.running = 0
        self.peak = 0
        self.started = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.rng = random.Random(seed)
        self.work_ms = work_ms

    async def __call__(self, event: Envelope, _: Delivery) -> list[Outgoing]:
        assert isinstance(event, GoalSubmitted)
        self.running += 1
        self.started += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            # Simulated work of random length, so completions come back out of order.
            await asyncio.sleep(self.rng.uniform(*self.work_ms) / 1000)
            self.order[event.goal_id].append(int(event.text))
        finally:
            self.running -= 1
        return []

    @property
    def processed(self) -> int:
        return sum(len(v) for v in self.order.values())


async def produce(kafka: KafkaSettings, topic: str, keys: int, per_key: int) -> None:
    """`per_key` messages for each of `keys` keys, interleaved: k0#0, k1#0, ..., k0#1, ..."""
    producer = Producer(kafka)
    await producer.client.start()
    try:
        sends = [
            await producer.client.send(topic, GoalSubmitted(tenant="t", goal_id=f"k{k}", text=str(seq)).to_bytes(), key=f"k{k}".encode())
            for seq in range(per_key)
            for k in range(keys)
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.client.stop()


@asynccontextmanager
async def consuming(
    settings: Settings,
    topic: str,
    handler: Handler,
    max_in_flight: int,
    retry: RetryPolicy | None = None,
    retry_levels: int = 0,
) -> AsyncIterator[ConcurrentKafkaConsumer]:
    producer = Producer(settings.kafka)
    await producer.client.start()
    topics = Topics(settings.platform.namespace, (), retry_levels=retry_levels).with_retries((topic,))
    sub = Subscription(f"{settings.platform.namespace}.group", topics, {GoalSubmitted: handler})
    consumer = ConcurrentKafkaConsumer(MessagePipeline(sub, producer, retry), settings.kafka, max_in_flight, "test")
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()
        await producer.client.stop()


async def committed_lag(kafka: KafkaSettings, group: str, topic: str) -> int:
    """End offsets minus the group's committed offsets, over the topic's partitions."""
    partitions = await topic_partitions(kafka, [topic])
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
    finally:
        await admin.close()
    reader = AIOKafkaConsumer(bootstrap_servers=kafka.require(), group_id=None)
    await reader.start()
    try:
        ends = await reader.end_offsets(partitions)
    finally:
        await reader.stop()
    return sum(ends[tp] - max(0, committed[tp].offset if tp in committed else 0) for tp in partitions)


async def test_every_keys_messages_are_processed_in_order_with_many_in_flight(settings: Settings) -> None:
    topic = f"{settings.platform.namespace}.ordered"
    await ensure_topics(settings.kafka, [topic, topic + ".dlq"], 3)
    await produce(settings.kafka, topic, keys=40, per_key=25)
    handler = Recorder(work_ms=(0, 15))
    async with consuming(settings, topic, handler, max_in_flight=32):
        await eventually(lambda: handler.processed == 1000, timeout=120)
        await eventually(lambda: _lag_is_zero(settings, topic), timeout=30)
    assert handler.order == {f"k{k}": list(range(25)) for k in range(40)}
    assert 3 < handler.peak <= 32, "more messages ran at once than there are partitions, never more than the limit"


async def _lag_is_zero(settings: Settings, topic: str) -> bool:
    return await committed_lag(settings.kafka, f"{settings.platform.namespace}.group", topic) == 0


async def test_with_the_limit_in_flight_the_replica_stops_fetching(settings: Settings) -> None:
    topic = f"{settings.platform.namespace}.pressure"
    await ensure_topics(settings.kafka, [topic, topic + ".dlq"], 3)
    await produce(settings.kafka, topic, keys=50, per_key=2)
    handler = Recorder()
    handler.gate.clear()  # a model that does not answer yet
    async with consuming(settings, topic, handler, max_in_flight=8) as consumer:
        await eventually(lambda: handler.started == 8, timeout=60)
        await eventually(lambda: consumer.consumer.paused() == consumer.consumer.assignment(), timeout=10)
        assert consumer.in_flight == 8 and handler.started == 8
        handler.gate.set()
        await eventually(lambda: handler.processed == 100, timeout=60)
    assert handler.peak == 8


async def test_a_second_replica_takes_over_partitions_without_losing_or_repeating_work(settings: Settings) -> None:
    topic = f"{settings.platform.namespace}.rebalanced"
    await ensure_topics(settings.kafka, [topic, topic + ".dlq"], 4)
    await produce(settings.kafka, topic, keys=40, per_key=20)
    # About 10 s of work for one replica alone, so the second joins in the middle of it.
    first, second = Recorder(work_ms=(50, 150), seed=1), Recorder(work_ms=(50, 150), seed=2)
    async with consuming(settings, topic, first, max_in_flight=8):
        await eventually(lambda: first.processed >= 50, timeout=60)
        async with consuming(settings, topic, second, max_in_flight=8):
            await eventually(lambda: first.processed + second.processed >= 800, timeout=120)
            await eventually(lambda: _lag_is_zero(settings, topic), timeout=30)
    assert second.processed > 0, "the new replica got partitions and worked on them"
    seen: dict[str, list[int]] = defaultdict(list)
    for recorder in (first, second):
        for key, seqs in recorder.order.items():
            seen[key] += seqs
    assert {k: sorted(v) for k, v in seen.items()} == {f"k{k}": list(range(20)) for k in range(40)}, "nothing lost, nothing twice"


async def test_a_message_in_backoff_holds_back_neither_its_partition_nor_other_keys_commits(settings: Settings) -> None:
    topic = f"{settings.platform.namespace}.backoff"
    topics = Topics(settings.platform.namespace, (), retry_levels=1)
    await ensure_topics(settings.kafka, [*topics.with_retries((topic,)), topic + ".dlq"], 1)
    await produce(settings.kafka, topic, keys=10, per_key=5)  # one partition: every key shares it
    handler = Recorder()
    failed_once = False

    async def flaky(event: Envelope, delivery: Delivery) -> list[Outgoing]:
        nonlocal failed_once
        if event.goal_id == "k0" and not failed_once:
            failed_once = True
            raise Retryable("the model answered 429")
        return await handler(event, delivery)

    retry = RetryPolicy(attempts=2, backoff_s=4.0, max_backoff_s=4.0)
    async with consuming(settings, topic, flaky, 16, retry=retry, retry_levels=1):
        # Everything but k0's first message is done and committed while k0 still waits out 4 s.
        await eventually(lambda: handler.processed == 49, timeout=30)
        await eventually(lambda: _lag_is_zero(settings, topic), timeout=30)
        assert "k0" not in handler.order or 0 not in handler.order["k0"]
        await eventually(lambda: 0 in handler.order.get("k0", []), timeout=30)
    assert handler.processed == 50
    assert sorted(handler.order["k0"]) == list(range(5))
