"""Kafka transport: a FastStream KafkaBroker with manual acknowledgement, and explicit topic creation.

Every message is acknowledged (committed) only after the pipeline has produced its outputs,
so delivery is at-least-once. FastStream's Kafka default, ACK_FIRST, would lose messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from services.runtime.bus import Delivery
from services.runtime.errors import ConfigurationError, TransportFailure
from services.runtime.pipeline import MessagePipeline
from services.runtime.settings import KafkaSettings

log = logging.getLogger("switchboard.kafka")

TOPIC_ALREADY_EXISTS = 36


def make_broker(kafka: KafkaSettings, client_id: str) -> KafkaBroker:
    return KafkaBroker(
        kafka.require(),
        client_id=client_id,
        enable_idempotence=True,  # implies acks=all
        logger=logging.getLogger("switchboard.faststream"),
    )


class KafkaProducer:
    """Adapts the broker's publisher to the pipeline's Producer protocol; waits for the ack."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        await self.broker.publish(value, topic=topic, key=key, headers=dict(headers))


async def _raw_body(message: Any) -> bytes:
    """Hand the handler the bytes exactly as produced; decoding is the pipeline's job."""
    body: bytes = message.body
    return body


def subscribe(broker: KafkaBroker, pipeline: MessagePipeline, kafka: KafkaSettings) -> None:
    sub = pipeline.subscription

    async def on_message(body: bytes, msg: KafkaMessage) -> None:
        record: ConsumerRecord[Any, Any] = msg.raw_message
        delivery = Delivery(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=body,
            headers={k: v.decode(errors="replace") for k, v in (record.headers or ())},
            timestamp_ms=record.timestamp,
            group=sub.group,
        )
        try:
            await pipeline.process(delivery)
        except TransportFailure:
            # Outputs could not be produced even after retrying for minutes. Committing would
            # skip this message and anything after it; stop the process instead so that the
            # group redelivers it once the broker is back.
            log.critical("cannot produce outputs; exiting without committing", exc_info=True)
            os._exit(75)
        await msg.ack()

    broker.subscriber(
        *sub.topics,
        group_id=sub.group,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        decoder=_raw_body,
    )(on_message)


async def topic_partitions(kafka: KafkaSettings, topics: list[str]) -> list[TopicPartition]:
    """Every partition of the given topics, as the broker describes them now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return [
        TopicPartition(topic["topic"], p["partition"])
        for topic in described
        for p in sorted(topic["partitions"], key=lambda p: p["partition"])
    ]


async def ensure_topics(kafka: KafkaSettings, topics: list[str], partitions: int) -> None:
    """Create missing topics with their partition counts (hardened brokers disable auto-create)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return
        response = await admin.create_topics(
            [NewTopic(t, partitions, kafka.replication_factor) for t in missing]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise ConfigurationError(f"could not create topic {name}: error {code} {rest}")
        log.info("created topics %s", missing)
    finally:
        await admin.close()
