"""Publishing a goal to Kafka and following its events, for the CLI (read-only apart from the goal)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError

from schemas.envelope import Envelope
from schemas.events import decode_event
from schemas.topics import Topics
from services.runtime.kafka_bus import ensure_topics, topic_partitions
from services.runtime.settings import KafkaSettings
from services.runtime.tracecontext import new_traceparent


async def publish(kafka: KafkaSettings, topic: str, event: Envelope, key: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.require(), enable_idempotence=True)
    await producer.start()
    try:
        headers = [("traceparent", new_traceparent().encode()), ("event_type", event.event_type.encode())]
        await producer.send_and_wait(topic, event.to_bytes(), key=key.encode(), headers=headers)
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def goal_follower(kafka: KafkaSettings, topics: Topics, partitions: int) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer positioned at the current end of every goal topic, opened *before* the goal is sent."""
    await ensure_topics(kafka, topics.all_topics(), partitions)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.require(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = await topic_partitions(kafka, topics.work_topics())
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        for tp, offset in ends.items():
            consumer.seek(tp, offset)
        yield consumer
    finally:
        await consumer.stop()


async def goal_events(consumer: AIOKafkaConsumer, goal_id: str) -> AsyncIterator[Envelope]:
    """Events of one goal, as they arrive. Messages that are not events are skipped."""
    while True:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            for record in records:
                try:
                    event = decode_event(record.value)
                except (ValidationError, ValueError):
                    continue
                if event.goal_id == goal_id:
                    yield event
