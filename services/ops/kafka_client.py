"""Kafka for the CLI: publishing a goal and following its events, reading topics to their current
end without a consumer group, and producing records as they are (for a dead-letter redrive)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from schemas.envelope import Envelope
from schemas.events import decode_event
from schemas.topics import Topics
from services.runtime.kafka_bus import RecordSender, ensure_topics, topic_partitions
from services.runtime.signing import Signer, event_headers
from services.runtime.settings import KafkaSettings
from services.runtime.tracecontext import new_traceparent


async def publish(kafka: KafkaSettings, topic: str, event: Envelope, key: str, signer: Signer) -> None:
    """One event, with the headers every service's events carry (signed, in a new trace)."""
    value = event.to_bytes()
    async with RecordSender(kafka, client_id="switchboard-cli") as sender:
        await sender.send(topic, key.encode(), value, event_headers(event, value, signer, new_traceparent()))


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


async def existing_partitions(kafka: KafkaSettings, topics: list[str]) -> list[TopicPartition]:
    """Every partition of those of `topics` that exist (a namespace that never failed has no DLQ topics)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    present = [t for t in topics if t in existing]
    return await topic_partitions(kafka, present) if present else []


@contextlib.asynccontextmanager
async def _reader(kafka: KafkaSettings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer outside any group: it commits nothing and moves no one's offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.require(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def read_to_end(kafka: KafkaSettings, topics: list[str], timeout_s: float = 120.0) -> list[ConsumerRecord]:
    """Every record of `topics`, from the beginning to the end offsets of when the read started.

    Empty partitions are not read at all, so an empty topic returns at once instead of waiting.
    Raises TimeoutError if the records cannot be fetched within `timeout_s`.
    """
    partitions = await existing_partitions(kafka, topics)
    if not partitions:
        return []
    async with _reader(kafka) as consumer:
        starts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        todo = {tp: end for tp, end in ends.items() if end > starts[tp]}
        if not todo:
            return []
        consumer.assign(list(todo))
        await consumer.seek_to_beginning(*todo)
        records: list[ConsumerRecord] = []
        async with asyncio.timeout(timeout_s):
            while todo:
                batches = await consumer.getmany(*todo, timeout_ms=500)
                for tp, batch in batches.items():
                    records += [r for r in batch if r.offset < todo.get(tp, 0)]
                for tp in list(todo):
                    if await consumer.position(tp) >= todo[tp]:
                        del todo[tp]
        return records


async def read_one(
    kafka: KafkaSettings, topic: str, partition: int, offset: int, timeout_s: float = 30.0
) -> ConsumerRecord | None:
    """The record at `offset`, or None when the partition does not hold it (never, or no longer)."""
    tp = TopicPartition(topic, partition)
    if tp not in await existing_partitions(kafka, [topic]):
        return None
    async with _reader(kafka) as consumer:
        start, end = (await consumer.beginning_offsets([tp]))[tp], (await consumer.end_offsets([tp]))[tp]
        if not start <= offset < end:
            return None
        consumer.assign([tp])
        consumer.seek(tp, offset)
        async with asyncio.timeout(timeout_s):
            while True:
                batch = (await consumer.getmany(tp, timeout_ms=500, max_records=1)).get(tp, [])
                for record in batch:
                    if record.offset >= offset:
                        # A compacted or transactional log may skip offsets: then it is gone.
                        return record if record.offset == offset else None
                if await consumer.position(tp) >= end:
                    return None
