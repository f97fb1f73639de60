"""Kafka transport pieces: the FastStream broker that produces (idempotent, acks=all), and explicit
topic creation. Consuming is kafka_consumer.ConcurrentKafkaConsumer, which commits an offset only
after the work and its outputs are done (never FastStream's ack-before-processing default).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker

from services.runtime.errors import ConfigurationError
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


class RecordSender:
    """Produces records with the key, value and headers it is given; each send waits for the ack.

    Idempotent (acks=all), like the services' producer. Fits services.runtime.bus.Producer.
    """

    def __init__(self, kafka: KafkaSettings, client_id: str = "switchboard") -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=kafka.require(), enable_idempotence=True, client_id=client_id)

    async def __aenter__(self) -> RecordSender:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]) -> None:
        encoded = [(name, text.encode()) for name, text in headers.items()]
        await self._producer.send_and_wait(topic, value, key=key, headers=encoded)
