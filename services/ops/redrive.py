"""Redriving dead letters: each is republished to the topic it came from, after its goal is reopened,
so that the goal resumes where it stopped. Paced, audited, and never twice unless asked.

A redrive never removes a record from its dead-letter topic (Kafka topics are append-only). It
writes an audit record naming it, and later redrives skip what the audit trail says was redriven.
"""

from __future__ import annotations

import asyncio
import getpass
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from schemas.envelope import Envelope
from schemas.events import AuditRecorded, GoalReopened, decode_event
from schemas.topics import Topics
from services.ops.dlq import DeadLetter
from services.ops.kafka_client import read_to_end
from services.runtime.budget import BudgetLedger
from services.runtime.bus import Producer
from services.runtime.errors import ConfigurationError, SwitchboardError
from services.runtime.pipeline import ATTEMPT, TRACEPARENT
from services.runtime.settings import KafkaSettings
from services.runtime.tracecontext import child_traceparent

REDRIVEN_FROM = "x-redriven-from"
REDRIVE_ACTION = "dlq.redrive"
# What the failed attempts added to the message. A redrive drops them: the message is tried afresh.
_ATTEMPT_HEADER_PREFIXES = ("x-dlq-", "x-retry-", "x-origin-")


def redrive_headers(record: DeadLetter) -> dict[str, str]:
    """The record's original headers without what the failed attempts added, naming the record."""
    headers = {
        name: value for name, value in record.headers.items()
        if name != ATTEMPT and name != REDRIVEN_FROM and not name.startswith(_ATTEMPT_HEADER_PREFIXES)
    }
    headers[REDRIVEN_FROM] = record.id
    return headers


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
            await deps.producer.send(record.original_topic, record.key, record.value, redrive_headers(record))
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
