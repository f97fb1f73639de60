"""Dead-letter records: read back from the namespace's `<topic>.dlq` topics, chosen and counted.
Sending them back where they came from is services/ops/redrive.py."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, get_args

from aiokafka import ConsumerRecord
from pydantic import ValidationError
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline, TimelineEntry
from schemas.envelope import Envelope
from schemas.events import decode_event
from schemas.topics import DLQ_SUFFIX, Topics
from services.ops.kafka_client import read_one, read_to_end

# Re-exported: the dlq commands parse their time options with these, as every command does.
from services.ops.terminal import parse_duration as parse_duration
from services.ops.terminal import parse_when as parse_when
from services.runtime.errors import DeadLetterReason
from services.runtime.settings import KafkaSettings

REASONS: tuple[str, ...] = get_args(DeadLetterReason)


def record_id(topic: str, partition: int, offset: int) -> str:
    return f"{topic}:{partition}:{offset}"


def parse_record_id(text: str) -> tuple[str, int, int]:
    """`<dlq topic>:<partition>:<offset>` as its parts; ValueError for anything else."""
    topic, _, rest = text.strip().partition(":")  # a Kafka topic name cannot contain ':'
    partition, _, offset = rest.partition(":")
    if not Topics.is_dlq(topic) or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"{text!r} is not a dead-letter record ID (<topic>.dlq:<partition>:<offset>)")
    return topic, int(partition), int(offset)


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic: the original message, and the headers that explain it."""

    dlq_topic: str
    partition: int
    offset: int
    timestamp_ms: int
    """When it was dead-lettered."""
    key: bytes | None
    value: bytes
    headers: Mapping[str, str]

    @classmethod
    def from_record(cls, record: ConsumerRecord) -> DeadLetter:
        headers = {name: raw.decode(errors="replace") for name, raw in record.headers or ()}
        return cls(
            record.topic, record.partition, record.offset, record.timestamp, record.key, record.value or b"", headers
        )

    @property
    def id(self) -> str:
        return record_id(self.dlq_topic, self.partition, self.offset)

    @property
    def reason(self) -> str:
        return self.headers.get("x-dlq-reason", "")

    @property
    def original_topic(self) -> str:
        """Where the message was consumed (a retried message: its work topic, not the retry topic)."""
        return self.headers.get("x-dlq-original-topic") or self.dlq_topic.removesuffix(DLQ_SUFFIX)

    @property
    def goal_id(self) -> str:
        return self.headers.get("x-dlq-goal-id") or (self.event.goal_id if self.event else "")

    @property
    def attempts(self) -> int:
        try:
            return int(self.headers.get("x-dlq-attempts", "1"))
        except ValueError:
            return 1

    @property
    def exception(self) -> str:
        name, message = self.headers.get("x-dlq-exception-class", ""), self.headers.get("x-dlq-exception-message", "")
        return f"{name}: {message}" if name and message else name or message

    @property
    def dead_lettered_at(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @cached_property
    def event(self) -> Envelope | None:
        """The message as an event; None for a poison message (it does not decode)."""
        try:
            return decode_event(self.value)
        except (ValidationError, ValueError):
            return None

    @property
    def tenant(self) -> str | None:
        if self.event is not None:
            return self.event.tenant
        try:  # best effort: a schema-invalid message may still name its tenant
            doc = json.loads(self.value)
        except ValueError:
            return None
        tenant = doc.get("tenant") if isinstance(doc, dict) else None
        return tenant if isinstance(tenant, str) and tenant else None

    def summary(self) -> dict[str, Any]:
        event = self.event
        return {
            "id": self.id,
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "dlq_topic": self.dlq_topic,
            "original_topic": self.original_topic,
            "original_partition": _int(self.headers.get("x-dlq-original-partition")),
            "original_offset": _int(self.headers.get("x-dlq-original-offset")),
            "consumer_group": self.headers.get("x-dlq-consumer-group", ""),
            "reason": self.reason,
            "goal_id": self.goal_id,
            "tenant": self.tenant,
            "event_type": event.event_type if event else None,
            "event_id": event.event_id if event else None,
            "exception_class": self.headers.get("x-dlq-exception-class", ""),
            "exception_message": self.headers.get("x-dlq-exception-message", ""),
            "attempts": self.attempts,
            "trace_id": self.headers.get("x-dlq-trace-id", ""),
        }


def _int(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() else None


def resolve_dlq_topic(name: str, topics: Topics) -> str:
    """The namespace's dead-letter topic that `name` means: the DLQ topic itself or the topic it
    belongs to, with or without the namespace (`tools`, `agent.writer`, `sb.goals.dlq`)."""
    prefix = f"{topics.namespace}."
    for candidate in (name, prefix + name):
        for dlq in topics.dlq_topics():
            if candidate in (dlq, dlq.removesuffix(DLQ_SUFFIX)):
                return dlq
    known = ", ".join(t.removeprefix(prefix).removesuffix(DLQ_SUFFIX) for t in topics.dlq_topics())
    raise ValueError(f"no dead-letter topic {name!r} in namespace {topics.namespace!r}; its topics: {known}")


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command is about: every criterion given must match; none given, all do."""

    dlq_topics: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    goals: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    @property
    def narrows(self) -> bool:
        return bool(self.dlq_topics or self.reasons or self.goals or self.ids or self.since or self.until)

    def topics_to_read(self, topics: Topics) -> list[str]:
        named_by_ids = {parse_record_id(i)[0] for i in self.ids}
        return [
            t for t in topics.dlq_topics()
            if (not self.dlq_topics or t in self.dlq_topics) and (not self.ids or t in named_by_ids)
        ]

    def matches(self, record: DeadLetter) -> bool:
        when = record.dead_lettered_at
        return (
            (not self.dlq_topics or record.dlq_topic in self.dlq_topics)
            and (not self.reasons or record.reason in self.reasons)
            and (not self.goals or record.goal_id in self.goals)
            and (not self.ids or record.id in self.ids)
            and (self.since is None or when >= self.since)
            and (self.until is None or when < self.until)
        )


async def select(kafka: KafkaSettings, topics: Topics, selection: Selection) -> list[DeadLetter]:
    """The namespace's dead letters that match, oldest first."""
    records = await read_to_end(kafka, selection.topics_to_read(topics))
    found = (DeadLetter.from_record(r) for r in records)
    return sorted(
        (d for d in found if selection.matches(d)), key=lambda d: (d.timestamp_ms, d.dlq_topic, d.partition, d.offset)
    )


async def fetch(kafka: KafkaSettings, record_id_: str) -> DeadLetter | None:
    topic, partition, offset = parse_record_id(record_id_)
    record = await read_one(kafka, topic, partition, offset)
    return DeadLetter.from_record(record) if record is not None else None


async def last_steps(redis: Redis, keys: RedisKeys, tenant: str, goal_id: str, count: int) -> list[Envelope]:
    """The newest `count` events of the goal's timeline, oldest first.

    Sorted by event time: the recorder reads each topic on its own, so the stream's order is only
    the order in which it got to them."""
    timeline = GoalTimeline(redis, keys, maxlen=0, ttl_s=0)  # only read: length and expiry are the recorder's
    events = [e for e in map(_decoded, await timeline.read(tenant, goal_id)) if e is not None]
    return sorted(events, key=lambda e: e.ts)[-count:] if count > 0 else []


def _decoded(entry: TimelineEntry) -> Envelope | None:
    try:
        return decode_event(entry.payload)
    except (ValidationError, ValueError):
        return None  # the recorder writes events only; an entry that is not one has nothing to show


@dataclass(frozen=True)
class Tally:
    depth: int = 0
    """Records in the dead-letter topic now."""
    recent: int = 0
    """Of those, the ones added within the window."""


@dataclass(frozen=True)
class DlqStats:
    window: timedelta
    by_topic: dict[str, Tally]
    by_reason: dict[str, Tally]

    @property
    def depth(self) -> int:
        return sum(t.depth for t in self.by_topic.values())

    @property
    def recent(self) -> int:
        return sum(t.recent for t in self.by_topic.values())

    def per_hour(self, count: int) -> float:
        return count / (self.window.total_seconds() / 3_600)


def tally(records: list[DeadLetter], dlq_topics: list[str], window: timedelta, now: datetime) -> DlqStats:
    """Depth per dead-letter topic (each of `dlq_topics`, empty ones too) and per reason, and growth."""
    since = now - window

    def count(key: Callable[[DeadLetter], str]) -> dict[str, Tally]:
        depth = Counter(key(r) for r in records)
        recent = Counter(key(r) for r in records if r.dead_lettered_at >= since)
        return {k: Tally(depth[k], recent[k]) for k in depth}

    by_topic = {t: Tally() for t in dlq_topics} | count(lambda r: r.dlq_topic)
    by_reason = dict(sorted(count(lambda r: r.reason or "(none)").items(), key=lambda kv: -kv[1].depth))
    return DlqStats(window, by_topic, by_reason)
