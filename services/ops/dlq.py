"""Dead-letter records: read back from the namespace's `<topic>.dlq` topics, chosen, counted, and
redriven to the topic they came from so that their goal resumes where it stopped.

A redrive never removes a record from its dead-letter topic (Kafka topics are append-only). It
writes an audit record naming it, and later redrives skip what the audit trail says was redriven.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import math
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, get_args

from aiokafka import ConsumerRecord
from pydantic import ValidationError
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline, TimelineEntry
from schemas.envelope import Envelope
from schemas.events import AuditRecorded, GoalReopened, decode_event
from schemas.topics import DLQ_SUFFIX, Topics
from services.ops.kafka_client import read_one, read_to_end
from services.runtime.budget import BudgetLedger
from services.runtime.bus import Producer
from services.runtime.errors import ConfigurationError, DeadLetterReason, SwitchboardError
from services.runtime.pipeline import ATTEMPT, TRACEPARENT
from services.runtime.settings import KafkaSettings
from services.runtime.tracecontext import child_traceparent

REASONS: tuple[str, ...] = get_args(DeadLetterReason)
REDRIVEN_FROM = "x-redriven-from"
REDRIVE_ACTION = "dlq.redrive"
# What the failed attempts added to the message. A redrive drops them: the message is tried afresh.
_ATTEMPT_HEADER_PREFIXES = ("x-dlq-", "x-retry-", "x-origin-")


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

    def redrive_headers(self) -> dict[str, str]:
        """The original headers without what the failed attempts added, naming this record."""
        headers = {
            name: value for name, value in self.headers.items()
            if name != ATTEMPT and name != REDRIVEN_FROM and not name.startswith(_ATTEMPT_HEADER_PREFIXES)
        }
        headers[REDRIVEN_FROM] = self.id
        return headers

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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h30m`, `2d`, `1w`; ValueError for anything else."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m, 2h, 1h30m, 1d or 1w")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return timedelta(seconds=seconds)


def parse_when(text: str, now: datetime) -> datetime:
    """A duration back from `now` (`2h`), or an ISO 8601 time (UTC unless it names its zone)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 2h, 1d) nor an ISO time (2025-05-01T12:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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


def redriven_ids(audit_values: Iterable[bytes]) -> set[str]:
    """IDs of the records an audit trail says were redriven (dry runs write no audit)."""
    ids: set[str] = set()
    for raw in audit_values:
        try:
            event = decode_event(raw)
        except (ValidationError, ValueError):
            continue
        if isinstance(event, AuditRecorded) and event.action == REDRIVE_ACTION and not event.detail.get("dry_run"):
            ids.add(event.subject)
    return ids


async def read_redriven(kafka: KafkaSettings, topics: Topics) -> set[str]:
    return redriven_ids(r.value for r in await read_to_end(kafka, [topics.audit]) if r.value)


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


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def goals_to_reopen(records: Iterable[DeadLetter]) -> list[tuple[str, str]]:
    """(tenant, goal_id) of each goal the records belong to, once, in the order they come up."""
    goals: dict[tuple[str, str], None] = {}
    for record in records:
        if record.event is not None:
            goals.setdefault((record.event.tenant, record.event.goal_id), None)
    return list(goals)


@dataclass(frozen=True)
class RedrivePlan:
    records: list[DeadLetter]
    """To redrive, oldest first."""
    skipped: list[DeadLetter]
    """Redriven before, by the audit trail, and not asked to be redriven again."""

    @property
    def undecodable(self) -> list[DeadLetter]:
        """Poison: republished without a reopen, they will most likely be dead-lettered again."""
        return [r for r in self.records if r.event is None]

    @property
    def goals(self) -> list[tuple[str, str]]:
        return goals_to_reopen(self.records)


def plan_redrive(selected: list[DeadLetter], redriven_before: set[str], again: bool) -> RedrivePlan:
    if again:
        return RedrivePlan(selected, [])
    return RedrivePlan(
        [r for r in selected if r.id not in redriven_before], [r for r in selected if r.id in redriven_before]
    )


class Pace:
    """Spaces calls at least 1/rate seconds apart.

    A redrive sends one record at a time and waits for its ack, so even spacing is all the throttle
    it needs; a token-bucket library (aiolimiter) would add a dependency for bursts it never makes.
    """

    def __init__(
        self, rate: float, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self._next = -math.inf

    async def wait(self) -> None:
        delay = self._next - self.clock()
        if delay > 0:
            await self.sleep(delay)
        self._next = max(self._next, self.clock()) + self.interval


@dataclass(frozen=True)
class RedriveDeps:
    producer: Producer
    topics: Topics
    actor: str
    budget: BudgetLedger | None
    """None without Redis: then only records that belong to no goal (poison) can be redriven."""
    default_tenant: str
    """Tenant of the audit record of a message that does not say (poison)."""
    pace: Pace


@dataclass
class RedriveReport:
    redriven: list[DeadLetter] = field(default_factory=list)
    reopened: list[tuple[str, str]] = field(default_factory=list)
    """(tenant, goal_id) of the goals reopened."""


class RedriveInterrupted(SwitchboardError):
    """A record could not be redriven; `report` says what was done before it."""

    def __init__(self, record: DeadLetter, report: RedriveReport, cause: BaseException) -> None:
        super().__init__(f"could not redrive {record.id}: {type(cause).__name__}: {cause}")
        self.record = record
        self.report = report


async def redrive(
    deps: RedriveDeps, records: list[DeadLetter], done: Callable[[DeadLetter], None] | None = None
) -> RedriveReport:
    """Republish each record to its original topic, as it first was, after reopening its goal.

    Key and value are unchanged, so the event keeps its id; the headers are the original ones
    without those the failed attempts added, so the message starts again at attempt 1. Each goal is
    reopened once, before its first record: its budget is let run again, and the orchestrator is
    told (GoalReopened) so it reopens the failed goal and resumes its parked tasks. Consumers then
    continue from their checkpoints, and idempotency keys keep a side effect that did happen from
    happening again. Every record redriven gets an audit record. Raises RedriveInterrupted at the
    first record that cannot be redriven.
    """
    if deps.budget is None and any(r.event is not None for r in records):
        raise ConfigurationError("REDIS_URL is not set: a redrive needs Redis to reopen the goals of these records")
    report = RedriveReport()
    reopened: set[tuple[str, str]] = set()
    for record in records:
        try:
            await deps.pace.wait()
            event = record.event
            if event is not None and (event.tenant, event.goal_id) not in reopened:
                await _reopen(deps, record, event)
                reopened.add((event.tenant, event.goal_id))
                report.reopened.append((event.tenant, event.goal_id))
            await deps.producer.send(record.original_topic, record.key, record.value, record.redrive_headers())
            await _audit(deps, record)
        except Exception as exc:
            raise RedriveInterrupted(record, report, exc) from exc
        report.redriven.append(record)
        if done is not None:
            done(record)
    return report


async def _reopen(deps: RedriveDeps, record: DeadLetter, event: Envelope) -> None:
    assert deps.budget is not None
    await deps.budget.reopen(event.tenant, event.goal_id)
    notice = GoalReopened(
        tenant=event.tenant, goal_id=event.goal_id, causation_id=event.event_id, reason="redrive",
        requested_by=deps.actor,
    )
    await _publish(deps, deps.topics.goals, notice, event.goal_id, record)


async def _audit(deps: RedriveDeps, record: DeadLetter) -> None:
    event = record.event
    entry = AuditRecorded(
        tenant=event.tenant if event else deps.default_tenant,
        goal_id=record.goal_id or "unknown",
        task_id=event.task_id if event else None,
        causation_id=event.event_id if event else None,
        action=REDRIVE_ACTION,
        actor=deps.actor,
        subject=record.id,
        detail={
            "target_topic": record.original_topic,
            "reason": record.reason,
            "goal_id": record.goal_id,
            "event_type": event.event_type if event else None,
            "event_id": event.event_id if event else None,
            "dry_run": False,
        },
    )
    await _publish(deps, deps.topics.audit, entry, record.id, record)


async def _publish(deps: RedriveDeps, topic: str, event: Envelope, key: str, record: DeadLetter) -> None:
    # In the trace of the goal the record belongs to.
    headers = {TRACEPARENT: child_traceparent(record.headers.get(TRACEPARENT)), "event_type": event.event_type}
    await deps.producer.send(topic, key.encode(), event.to_bytes(), headers)
