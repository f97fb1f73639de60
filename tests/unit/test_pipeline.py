"""The message pipeline's dead-letter path: bad input gets a reason, and nothing is lost."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from schemas.envelope import Envelope
from schemas.events import GoalSubmitted
from services.runtime.bus import Delivery, Outgoing, Subscription
from services.runtime.errors import Permanent, Retryable
from services.runtime.pipeline import MessagePipeline, RetryPolicy


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, dict[str, str]]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]) -> None:
        self.sent.append((topic, key, value, dict(headers)))


def delivery(value: bytes, headers: dict[str, str] | None = None) -> Delivery:
    return Delivery("t.goals", 2, 41, b"k1", value, headers or {}, 1_700_000_000_000, "t.orchestrator")


GOAL = GoalSubmitted(tenant="acme", goal_id="g1", text="hello")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def pipeline(handler: object, attempts: int = 3) -> tuple[MessagePipeline, RecordingProducer]:
    producer = RecordingProducer()
    sub = Subscription("t.orchestrator", ("t.goals",), {GoalSubmitted: handler})  # type: ignore[dict-item]
    return MessagePipeline(sub, producer, RetryPolicy(attempts=attempts, initial_s=0.001, max_s=0.002)), producer


async def echo(event: Envelope, _: Delivery) -> list[Outgoing]:
    return [Outgoing("t.progress", event, event.goal_id)]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\xffnot json", "poison"),
        (b'{"event_type": "goal.exploded", "tenant": "a", "goal_id": "g"}', "unknown_event"),
        (b'{"event_type": "goal.submitted", "tenant": "a", "goal_id": "g1"}', "schema_invalid"),
        (b"[1, 2]", "schema_invalid"),
        (b"x" * 1_000_001, "poison"),
    ],
)
async def test_undecodable_messages_go_to_the_dead_letter_topic_with_their_reason(raw: bytes, reason: str) -> None:
    pipe, producer = pipeline(echo)
    await pipe.process(delivery(raw, {"traceparent": TRACEPARENT}))
    [(topic, key, value, headers)] = producer.sent
    assert topic == "t.goals.dlq"
    assert (key, value) == (b"k1", raw)
    assert headers["x-dlq-reason"] == reason
    assert headers["x-dlq-original-topic"] == "t.goals"
    assert headers["x-dlq-original-partition"] == "2"
    assert headers["x-dlq-original-offset"] == "41"
    assert headers["x-dlq-original-timestamp"] == "1700000000000"
    assert headers["x-dlq-consumer-group"] == "t.orchestrator"
    assert headers["x-dlq-exception-class"]
    assert headers["x-dlq-trace-id"] == "0af7651916cd43dd8448eb211c80319c"
    assert headers["traceparent"] == TRACEPARENT  # original headers are kept


async def test_a_valid_event_produces_its_outputs_on_the_same_trace() -> None:
    pipe, producer = pipeline(echo)
    await pipe.process(delivery(GOAL.to_bytes(), {"traceparent": TRACEPARENT}))
    [(topic, key, value, headers)] = producer.sent
    assert (topic, key) == ("t.progress", b"g1")
    assert headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert headers["traceparent"] != TRACEPARENT


async def test_transient_failures_are_retried_then_dead_lettered_as_exhausted() -> None:
    attempts = 0

    async def flaky(event: Envelope, _: Delivery) -> list[Outgoing]:
        nonlocal attempts
        attempts += 1
        raise Retryable("model rate limited")

    pipe, producer = pipeline(flaky, attempts=3)
    await pipe.process(delivery(GOAL.to_bytes()))
    assert attempts == 3
    [(topic, _, _, headers)] = producer.sent
    assert topic == "t.goals.dlq"
    assert headers["x-dlq-reason"] == "retries_exhausted"
    assert headers["x-dlq-exception-class"] == "Retryable"
    assert headers["x-dlq-goal-id"] == "g1"


async def test_permanent_failures_are_not_retried() -> None:
    attempts = 0

    async def denied(event: Envelope, _: Delivery) -> list[Outgoing]:
        nonlocal attempts
        attempts += 1
        raise Permanent("no such tool", reason="tool_denied")

    pipe, producer = pipeline(denied)
    await pipe.process(delivery(GOAL.to_bytes()))
    assert attempts == 1
    assert producer.sent[0][3]["x-dlq-reason"] == "tool_denied"


async def test_an_event_the_group_does_not_handle_is_dead_lettered_as_unknown() -> None:
    pipe, producer = pipeline(echo)
    other = GoalSubmitted(tenant="a", goal_id="g", text="x").model_copy()
    sub = Subscription("t.g", ("t.goals",), {})
    pipe = MessagePipeline(sub, producer)
    await pipe.process(delivery(other.to_bytes()))
    assert producer.sent[0][3]["x-dlq-reason"] == "unknown_event"


async def test_an_observer_skips_what_it_cannot_decode_so_each_bad_message_is_dead_lettered_once() -> None:
    producer = RecordingProducer()
    seen: list[str] = []

    async def record(event: Envelope, _: Delivery) -> list[Outgoing]:
        seen.append(event.event_id)
        return []

    observer = MessagePipeline(Subscription("t.recorder", ("t.goals",), fallback=record, observer=True), producer)
    await observer.process(delivery(b"not json"))
    await observer.process(delivery(GOAL.to_bytes()))
    assert producer.sent == []
    assert seen == [GOAL.event_id]
