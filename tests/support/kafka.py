"""Test helpers for the real Kafka broker: publish raw messages and wait for the records you expect."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    GroupCoordinatorNotAvailableError,
    NotCoordinatorForGroupError,
)
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from schemas.envelope import Envelope
from schemas.events import decode_event
from services.runtime.kafka_bus import topic_partitions
from services.runtime.settings import KafkaSettings, PlatformSettings
from services.runtime.signing import SIGNATURE, Signer
from services.runtime.tracecontext import new_traceparent


@dataclass(frozen=True)
class Seen:
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    event: Envelope | None


class TopicWatch:
    """Reads the given topics from the beginning and remembers everything it has seen."""

    def __init__(self, kafka: KafkaSettings, topics: list[str]) -> None:
        self.kafka = kafka
        self.topics = topics
        self.seen: list[Seen] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> TopicWatch:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.require(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        self._partitions = await topic_partitions(self.kafka, self.topics)
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def _poll(self) -> None:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for r in records:
                try:
                    event: Envelope | None = decode_event(r.value)
                except (ValidationError, ValueError):
                    event = None
                headers = {k: v.decode(errors="replace") for k, v in (r.headers or ())}
                self.seen.append(Seen(r.topic, r.key, r.value, headers, event))

    async def wait_for(self, predicate: Callable[[Seen], bool], count: int = 1, timeout: float = 60.0) -> list[Seen]:
        """The first `count` records matching `predicate`; fails the test after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while len(matches := [s for s in self.seen if predicate(s)]) < count:
                await self._poll()
        return matches[:count]

    async def until(self, done: Callable[[list[Seen]], bool], timeout: float = 60.0) -> list[Seen]:
        """Everything seen, once `done` holds for it; fails the test after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not done(self.seen):
                await self._poll()
        return self.seen

    async def caught_up(self, timeout: float = 60.0) -> list[Seen]:
        """Everything seen once every record on the watched topics, as of now, has been read."""
        assert self._consumer is not None
        consumer = self._consumer
        ends = await consumer.end_offsets(self._partitions)

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        async with asyncio.timeout(timeout):
            while await behind():
                await self._poll()
        return self.seen

    async def event(self, kind: type, /, timeout: float = 60.0, **fields: Any) -> Any:
        def match(s: Seen) -> bool:
            return isinstance(s.event, kind) and all(getattr(s.event, k) == v for k, v in fields.items())

        [seen] = await self.wait_for(match, timeout=timeout)
        return seen.event

    async def events(self, kind: type, count: int, /, timeout: float = 60.0, **fields: Any) -> list[Any]:
        def match(s: Seen) -> bool:
            return isinstance(s.event, kind) and all(getattr(s.event, k) == v for k, v in fields.items())

        return [s.event for s in await self.wait_for(match, count=count, timeout=timeout)]


class RawProducer:
    """Sends as a test wants: unsigned by default, as a forger would; `signed=True` plays a platform
    service, signing with the key the services use (SWITCHBOARD_SIGNING_KEY, else the development key)."""

    def __init__(self, kafka: KafkaSettings, signer: Signer | None = None) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=kafka.require(), enable_idempotence=True)
        self.signer = signer or Signer.from_setting(PlatformSettings().signing_key)

    async def __aenter__(self) -> RawProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(
        self, topic: str, value: bytes | None, key: str = "k", *, signed: bool = False,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        """`value=None` sends a tombstone: a record with no value at all."""
        headers = {"traceparent": new_traceparent(), **(extra_headers or {})}
        if signed and value is not None:
            headers[SIGNATURE] = self.signer.sign(value)
        encoded = [(name, text.encode()) for name, text in headers.items()]
        await self.producer.send_and_wait(topic, value, key=key.encode(), headers=encoded)

    async def event(self, topic: str, event: Envelope, key: str | None = None, *, signed: bool = False) -> None:
        await self.send(topic, event.to_bytes(), key or event.task_id or event.goal_id, signed=signed)


async def uncommitted(kafka: KafkaSettings, group: str, topics: list[str]) -> int:
    """How many records of `topics` the consumer group has not committed yet."""
    partitions = await topic_partitions(kafka, topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.require(), group_id=None, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
        await admin.close()
    return sum(end - max(0, committed[tp].offset if tp in committed else 0) for tp, end in ends.items())


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def eventually(condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll `condition` (sync or async) until it returns a truthy value; TimeoutError after `timeout`."""

    def timed_out(state: RetryCallState) -> Any:
        raise TimeoutError(f"condition not met within {timeout}s (last value {state.outcome and state.outcome.result()!r})")

    value: Any = None
    retrying = AsyncRetrying(
        stop=stop_after_delay(timeout), wait=wait_fixed(interval), retry=retry_if_result(lambda r: not r),
        retry_error_callback=timed_out,
    )
    async for attempt in retrying:
        with attempt:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
        if attempt.retry_state.outcome and not attempt.retry_state.outcome.failed:
            attempt.retry_state.set_result(value)
    return value


async def drop_namespace_topics(kafka: KafkaSettings, namespace: str) -> None:
    """Delete every topic of a test's namespace (`<namespace>.*`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(f"{namespace}.")]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def group_members(kafka: KafkaSettings, group: str) -> int:
    """Members of a consumer group once its assignment is settled (0 while it rebalances)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.require())
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
    except (GroupCoordinatorNotAvailableError, NotCoordinatorForGroupError, CoordinatorLoadInProgressError):
        return 0  # a new broker creates its group coordinator on first use
    finally:
        await admin.close()
    [description] = response.to_object()["groups"]
    return len(description["members"]) if description["state"] == "Stable" else 0
