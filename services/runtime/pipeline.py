"""The one path every consumed message takes, on Kafka and on the in-process bus alike.

decode -> verify -> handle -> produce outputs -> return. The transport commits only after `process`
returns. A transient failure sends the message to `<topic>.retry.<n>` to wait out its backoff
there, so it holds back neither its partition nor the commits of other keys; after the last
attempt, or on a permanent failure or a poison message, it goes to `<topic>.dlq` with its reason.
The consumer keeps going. Every output is signed (x-signature); an event type the subscription
requires signed is refused, dead-lettered as `tool_denied` and audited, unless its signature verifies.
Each message is handled in a CONSUMER span under the `traceparent` it came with, and every output
carries that span's (services/runtime/tracing.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, stop_after_delay, wait_exponential_jitter

from schemas.envelope import Envelope
from schemas.events import (
    EVENT_TYPES,
    AuditRecorded,
    ToolCallRequested,
    WorkDeadLettered,
    decode_event,
)
from schemas.topics import Topics
from services.runtime.audit import TOOL_DENIED, tool_audit
from services.runtime.bus import Delivery, Outgoing, Producer, Subscription
from services.runtime.errors import (
    DeadLetterReason,
    GoalStopped,
    Permanent,
    Retryable,
    ToolDenied,
    TransportFailure,
)
from services.runtime.metrics import NOT_AN_EVENT, Metrics, StepOutcome
from services.runtime.signing import DEVELOPMENT_KEY, Signer, event_headers
from services.runtime.tracecontext import trace_id
from services.runtime.tracing import TRACEPARENT as TRACEPARENT
from services.runtime.tracing import Tracing, failed, inject

log = logging.getLogger("switchboard.pipeline")

MAX_MESSAGE_BYTES = 512 * 1024
"""Larger messages are poison. Well under the broker's default 1 MiB, so the dead-letter record
(the same value plus headers) still fits."""
# Dead-lettering one of these does not fail its goal: they are the goal's ending or its bookkeeping.
_NO_NOTICE = frozenset({"work.dead_lettered", "goal.reopened", "goal.failed", "goal.completed", "audit.recorded"})
ATTEMPT = "x-attempt"
RETRY_DUE_MS = "x-retry-due-ms"
RETRY_GROUP = "x-retry-group"
ORIGIN = ("x-origin-topic", "x-origin-partition", "x-origin-offset", "x-origin-timestamp")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Retryable | RedisConnectionError | RedisTimeoutError | TimeoutError)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts for transient failures, and the backoff each retry waits out in a retry topic."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def backoff(self, level: int, rng: random.Random) -> float:
        """Exponential backoff with jitter for the `level`-th retry (1-based)."""
        exponential: float = self.backoff_s * 2.0 ** (level - 1)
        return min(self.max_backoff_s, exponential) + rng.uniform(0, self.backoff_s)


@dataclass(frozen=True)
class Rejection:
    reason: DeadLetterReason
    error: BaseException
    outputs: tuple[Outgoing, ...] = ()
    """Produced along with the dead-letter record (what the step did before it failed)."""


@dataclass(frozen=True)
class RetryLater:
    error: BaseException


def classify_undecodable(raw: bytes, error: Exception) -> DeadLetterReason:
    """Why a message could not become an event: not JSON, an unknown type, or a bad schema."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return "poison"
    try:
        doc = json.loads(raw)
    except ValueError:
        return "poison"
    if not isinstance(doc, dict):
        return "schema_invalid"
    event_type = doc.get("event_type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        return "unknown_event"
    return "schema_invalid"


def attempt_of(delivery: Delivery) -> int:
    try:
        return max(1, int(delivery.headers.get(ATTEMPT, "1")))
    except ValueError:
        return 1


class MessagePipeline:
    def __init__(
        self,
        subscription: Subscription,
        producer: Producer,
        retry: RetryPolicy | None = None,
        publish_deadline_s: float = 120.0,
        notify_topic: str | None = None,
        signer: Signer | None = None,
        audit_topic: str | None = None,
        metrics: Metrics | None = None,
        service: str | None = None,
        tracing: Tracing | None = None,
        messaging_system: str = "kafka",
    ) -> None:
        self.subscription = subscription
        self.producer = producer
        self.retry = retry or RetryPolicy()
        self.notify_topic = notify_topic
        """Where the orchestrator hears that a goal's work was dead-lettered (so the goal fails)."""
        self.publish_deadline_s = publish_deadline_s
        self.signer = signer or Signer(DEVELOPMENT_KEY)
        self.audit_topic = audit_topic
        """Where a refused unsigned or tampered request is audited (none: not audited)."""
        self.metrics = metrics or Metrics()
        self.service = service or subscription.group
        """The `service` label of this pipeline's metrics."""
        self.tracing = tracing or Tracing.local()
        self.messaging_system = messaging_system
        self._rng = random.Random()

    async def process(self, delivery: Delivery) -> None:
        """Handle one message completely. Returns when it may be committed.

        Raises TransportFailure when outputs could not be produced: the caller must then
        not commit this message (it will be redelivered).
        """
        on_retry_topic = Topics.origin(delivery.topic) != delivery.topic
        owner = delivery.headers.get(RETRY_GROUP)
        if on_retry_topic and owner is not None and owner != self.subscription.group:
            return  # a retry of another consumer group that reads the same topic
        if on_retry_topic:
            await self._wait_until_due(delivery)
        started = time.perf_counter()
        with self.tracing.processing(delivery, self.messaging_system) as span:
            event, rejection = self._decode(delivery)
            if event is not None:
                self.tracing.describe(span, event)
            outcome: StepOutcome = "failed"
            try:
                outcome = await self._finish(delivery, event, rejection)
            finally:
                event_type = event.event_type if event is not None else NOT_AN_EVENT
                self.metrics.step(self.service, event_type, outcome, time.perf_counter() - started)
                span.set_attribute("switchboard.outcome", outcome)

    async def _finish(self, delivery: Delivery, event: Envelope | None, rejection: Rejection | None) -> StepOutcome:
        if rejection is not None and self.subscription.observer:
            log.warning(
                "observer %s skipped %s[%d]@%d (%s); the topic's own consumer dead-letters it",
                self.subscription.group, delivery.topic, delivery.partition, delivery.offset, rejection.reason,
            )
            return "skipped"
        if rejection is None and event is not None:
            outcome = await self._handle(event, delivery)
            if isinstance(outcome, list):
                await self._produce(outcome, delivery)
                return "ok"
            if isinstance(outcome, RetryLater):
                await self.retry_later(delivery, outcome.error)
                return "retried"
            rejection = outcome
        assert rejection is not None
        await self.dead_letter(delivery, rejection, event)
        return "dead_lettered"

    async def _wait_until_due(self, delivery: Delivery) -> None:
        """A retried message waits out its backoff here. It holds one in-flight slot and the
        commits of its retry partition (whose messages are waiting too), never its origin's.
        Never longer than the longest backoff, whatever the header says."""
        due_ms = delivery.headers.get(RETRY_DUE_MS)
        if due_ms is None:
            return
        try:
            delay = int(due_ms) / 1000 - time.time()
        except ValueError:
            return
        longest = self.retry.max_backoff_s + self.retry.backoff_s
        if delay > 0:
            await asyncio.sleep(min(delay, longest))

    def _decode(self, delivery: Delivery) -> tuple[Envelope | None, Rejection | None]:
        if len(delivery.value) > MAX_MESSAGE_BYTES:
            return None, Rejection("poison", ValueError(f"message of {len(delivery.value)} bytes"))
        try:
            event = decode_event(delivery.value)
        except (ValidationError, ValueError) as exc:
            return None, Rejection(classify_undecodable(delivery.value, exc), exc)
        return event, None

    async def _handle(self, event: Envelope, delivery: Delivery) -> list[Outgoing] | RetryLater | Rejection:
        if type(event) in self.subscription.require_signature:
            problem = self.signer.problem(delivery.value, delivery.headers)
            if problem is not None:
                return self._refuse_unsigned(event, problem)
        handler = self.subscription.handler_for(event)
        if handler is None:
            exc = ValueError(f"{event.event_type} is not handled by {self.subscription.group}")
            return Rejection("unknown_event", exc)
        try:
            if self.subscription.agent is None:
                return await handler(event, delivery)
            with self.tracing.agent(self.subscription.agent, event):
                return await handler(event, delivery)
        except GoalStopped as exc:
            log.info("%s of %s not handled: %s", event.event_type, event.task_id or event.goal_id, exc)
            return []
        except Permanent as exc:
            log.warning("permanent failure (%s) for %s: %s", exc.reason, event.event_type, exc)
            return Rejection(exc.reason, exc, tuple(exc.outputs))
        except Exception as exc:
            if not _is_transient(exc):
                # A bug: trying again cannot help, and it must not stop the partition.
                log.exception("handler for %s raised", event.event_type)
                return Rejection("retries_exhausted", exc)
            if attempt_of(delivery) >= self.retry.attempts:
                log.warning("retries exhausted for %s: %r", event.event_type, exc)
                return Rejection("retries_exhausted", exc)
            return RetryLater(exc)

    def _refuse_unsigned(self, event: Envelope, problem: str) -> Rejection:
        """A forged or tampered request: its handler never runs. Dead-lettered and audited."""
        error = ToolDenied(f"{event.event_type} refused by {self.subscription.group}: {problem}", policy="signature")
        log.warning("refused %s %s: %s", event.event_type, event.event_id, problem)
        if self.audit_topic is None:
            return Rejection(error.reason, error)
        detail = {"policy": error.policy, "reason": error.reason, "error": problem}
        if isinstance(event, ToolCallRequested):
            record = tool_audit(event, TOOL_DENIED, **detail)
        else:
            record = AuditRecorded(
                **event.caused(), action=TOOL_DENIED, actor="unknown", subject=event.event_id,
                detail={"event_type": event.event_type, "goal": event.goal_id, **detail},
            )
        return Rejection(error.reason, error, (Outgoing(self.audit_topic, record, event.goal_id),))

    async def retry_later(self, delivery: Delivery, error: BaseException) -> None:
        """Park the message, unchanged, in the retry topic of its attempt, due after a backoff."""
        attempt = attempt_of(delivery)
        delay = self.retry.backoff(attempt, self._rng)
        hint = error.retry_after_s if isinstance(error, Retryable) else None
        if hint is not None:
            delay = max(delay, min(hint, self.retry.max_backoff_s))
        headers = dict(delivery.headers)
        for name, value in zip(
            ORIGIN, (delivery.topic, delivery.partition, delivery.offset, delivery.timestamp_ms), strict=True
        ):
            headers.setdefault(name, str(value))
        headers.update(
            {
                ATTEMPT: str(attempt + 1),
                RETRY_DUE_MS: str(int((time.time() + delay) * 1000)),
                RETRY_GROUP: self.subscription.group,
                "x-retry-exception-class": type(error).__name__,
                "x-retry-exception-message": str(error)[:2_000],
            }
        )
        target = Topics.retry(delivery.topic, attempt)
        log.info("attempt %d failed (%r); retrying in %.1fs via %s", attempt, error, delay, target)
        failed(trace.get_current_span(), error)
        await self._send(target, delivery.key, delivery.value, headers)
        self.metrics.retry(self.service, Topics.origin(delivery.topic), attempt)

    async def _produce(self, outputs: list[Outgoing], delivery: Delivery) -> None:
        for out in outputs:
            value = out.event.to_bytes()
            headers = event_headers(out.event, value, self.signer)
            inject(headers, delivery.headers)
            await self._send(out.topic, out.key.encode(), value, headers)
            self.metrics.produced(out.event)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.publish_deadline_s),
            wait=wait_exponential_jitter(multiplier=0.5, max=10, jitter=0.5),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.producer.send(topic, key, value, headers)
        except Exception as exc:
            raise TransportFailure(f"could not produce to {topic}: {exc!r}") from exc

    async def dead_letter(
        self, delivery: Delivery, rejection: Rejection, event: Envelope | None = None
    ) -> None:
        """Write the original message, untouched, to `<topic>.dlq` with headers that explain it."""
        if rejection.outputs:
            await self._produce(list(rejection.outputs), delivery)
        error = rejection.error
        headers = dict(delivery.headers)
        here = (delivery.topic, delivery.partition, delivery.offset, delivery.timestamp_ms)
        topic, partition, offset, timestamp = (headers.get(name, str(v)) for name, v in zip(ORIGIN, here, strict=True))
        headers.update(
            {
                "x-dlq-reason": rejection.reason,
                "x-dlq-original-topic": topic,
                "x-dlq-original-partition": partition,
                "x-dlq-original-offset": offset,
                "x-dlq-original-timestamp": timestamp,
                "x-dlq-consumer-group": delivery.group,
                "x-dlq-exception-class": type(error).__name__,
                "x-dlq-exception-message": str(error)[:2_000],
                "x-dlq-attempts": str(attempt_of(delivery)),
                "x-dlq-goal-id": event.goal_id if event else _goal_id_of(delivery.value),
                "x-dlq-trace-id": trace_id(delivery.headers.get(TRACEPARENT)) or "",
            }
        )
        log.warning(
            "dead-lettered %s[%d]@%d reason=%s: %s",
            delivery.topic, delivery.partition, delivery.offset, rejection.reason, error,
        )
        failed(trace.get_current_span(), error, kind=rejection.reason)
        await self._send(Topics.dlq(delivery.topic), delivery.key, delivery.value, headers)
        self.metrics.dead_letter(self.service, Topics.origin(delivery.topic), rejection.reason)
        if event is not None and self.notify_topic and event.event_type not in _NO_NOTICE:
            notice = WorkDeadLettered(
                **event.caused(),
                reason=rejection.reason,
                detail=f"{type(error).__name__}: {error}"[:4_000],
                dead_event_type=event.event_type,
                dead_event_id=event.event_id,
                dlq_topic=Topics.dlq(delivery.topic),
                original_topic=topic,
                original_partition=int(partition),
                original_offset=int(offset),
                consumer_group=delivery.group,
                figures=error.figures if isinstance(error, Permanent) else {},
            )
            await self._produce([Outgoing(self.notify_topic, notice, event.goal_id)], delivery)


def _goal_id_of(raw: bytes) -> str:
    """Best effort: a schema-invalid message may still name its goal."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    value = doc.get("goal_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""
