"""The one path every consumed message takes, on Kafka and on the in-process bus alike.

decode -> handle (with bounded retries for transient errors) -> produce outputs -> return.
The transport commits only after `process` returns. Poison and permanent failures go to the
topic's dead-letter topic with their reason; the consumer keeps going.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from schemas.envelope import Envelope
from schemas.events import EVENT_TYPES, decode_event
from schemas.topics import Topics
from services.runtime.bus import Delivery, Outgoing, Producer, Subscription
from services.runtime.errors import DeadLetterReason, Permanent, Retryable, TransportFailure
from services.runtime.tracecontext import child_traceparent, trace_id

log = logging.getLogger("switchboard.pipeline")

MAX_MESSAGE_BYTES = 1_000_000
TRACEPARENT = "traceparent"


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Retryable | RedisConnectionError | RedisTimeoutError | TimeoutError)


@dataclass(frozen=True)
class RetryPolicy:
    """In-process retry of transient failures. Bounded; the retry-topic path replaces it later."""

    attempts: int = 4
    initial_s: float = 0.2
    max_s: float = 5.0


@dataclass(frozen=True)
class Rejection:
    reason: DeadLetterReason
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
    if doc.get("event_type") not in EVENT_TYPES:
        return "unknown_event"
    return "schema_invalid"


class MessagePipeline:
    def __init__(
        self,
        subscription: Subscription,
        producer: Producer,
        retry: RetryPolicy | None = None,
        publish_deadline_s: float = 120.0,
    ) -> None:
        self.subscription = subscription
        self.producer = producer
        self.retry = retry or RetryPolicy()
        self.publish_deadline_s = publish_deadline_s

    async def process(self, delivery: Delivery) -> None:
        """Handle one message completely. Returns when it may be committed.

        Raises TransportFailure when outputs could not be produced: the caller must then
        not commit this message (it will be redelivered).
        """
        event, rejection = self._decode(delivery)
        if rejection is not None and self.subscription.observer:
            log.warning(
                "observer %s skipped %s[%d]@%d (%s); the topic's own consumer dead-letters it",
                self.subscription.group, delivery.topic, delivery.partition, delivery.offset, rejection.reason,
            )
            return
        if rejection is None and event is not None:
            rejection, outputs = await self._handle(event, delivery)
            if rejection is None:
                await self._produce(outputs, delivery)
                return
        assert rejection is not None
        await self.dead_letter(delivery, rejection, event)

    def _decode(self, delivery: Delivery) -> tuple[Envelope | None, Rejection | None]:
        if len(delivery.value) > MAX_MESSAGE_BYTES:
            return None, Rejection("poison", ValueError(f"message of {len(delivery.value)} bytes"))
        try:
            event = decode_event(delivery.value)
        except (ValidationError, ValueError) as exc:
            return None, Rejection(classify_undecodable(delivery.value, exc), exc)
        return event, None

    async def _handle(
        self, event: Envelope, delivery: Delivery
    ) -> tuple[Rejection | None, list[Outgoing]]:
        handler = self.subscription.handler_for(event)
        if handler is None:
            exc = ValueError(f"{event.event_type} is not handled by {self.subscription.group}")
            return Rejection("unknown_event", exc), []
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential_jitter(multiplier=self.retry.initial_s, max=self.retry.max_s, jitter=self.retry.initial_s),
            retry=retry_if_exception(_is_transient),
            reraise=False,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return None, await handler(event, delivery)
        except RetryError as exc:
            cause = exc.last_attempt.exception() or exc
            log.warning("retries exhausted for %s: %r", event.event_type, cause)
            return Rejection("retries_exhausted", cause), []
        except Permanent as exc:
            log.warning("permanent failure (%s) for %s: %s", exc.reason, event.event_type, exc)
            return Rejection(exc.reason, exc), []
        except Exception as exc:  # a bug must not stop the partition: it is dead-lettered instead
            log.exception("handler for %s raised", event.event_type)
            return Rejection("retries_exhausted", exc), []
        raise AssertionError("unreachable")

    async def _produce(self, outputs: list[Outgoing], delivery: Delivery) -> None:
        parent = delivery.headers.get(TRACEPARENT)
        for out in outputs:
            headers = {TRACEPARENT: child_traceparent(parent), "event_type": out.event.event_type}
            await self._send(out.topic, out.key.encode(), out.event.to_bytes(), headers)

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
        error = rejection.error
        headers = dict(delivery.headers)
        headers.update(
            {
                "x-dlq-reason": rejection.reason,
                "x-dlq-original-topic": delivery.topic,
                "x-dlq-original-partition": str(delivery.partition),
                "x-dlq-original-offset": str(delivery.offset),
                "x-dlq-original-timestamp": str(delivery.timestamp_ms),
                "x-dlq-consumer-group": delivery.group,
                "x-dlq-exception-class": type(error).__name__,
                "x-dlq-exception-message": str(error)[:2_000],
                "x-dlq-attempts": headers.get("x-attempt", "1"),
                "x-dlq-goal-id": event.goal_id if event else _goal_id_of(delivery.value),
                "x-dlq-trace-id": trace_id(delivery.headers.get(TRACEPARENT)) or "",
            }
        )
        log.warning(
            "dead-lettered %s[%d]@%d reason=%s: %s",
            delivery.topic, delivery.partition, delivery.offset, rejection.reason, error,
        )
        await self._send(Topics.dlq(delivery.topic), delivery.key, delivery.value, headers)


def _goal_id_of(raw: bytes) -> str:
    """Best effort: a schema-invalid message may still name its goal."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    value = doc.get("goal_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""
