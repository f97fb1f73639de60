"""The message pipeline's dead-letter path: bad input gets a reason, and nothing is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import pytest

from schemas.envelope import Envelope
from schemas.events import AuditRecorded, GoalSubmitted, ToolCallRequested, WorkDeadLettered, decode_event
from services.runtime.bus import Delivery, Outgoing, Subscription
from services.runtime.errors import BudgetExceeded, GoalStopped, Permanent, Retryable
from services.runtime.pipeline import MessagePipeline, RetryPolicy
from services.runtime.signing import DEVELOPMENT_KEY, SIGNATURE, Signer


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
    return MessagePipeline(sub, producer, RetryPolicy(attempts=attempts, backoff_s=0.05, max_backoff_s=0.2)), producer


async def echo(event: Envelope, _: Delivery) -> list[Outgoing]:
    return [Outgoing("t.progress", event, event.goal_id)]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\xffnot json", "poison"),
        (b'{"event_type": "goal.exploded", "tenant": "a", "goal_id": "g"}', "unknown_event"),
        (b'{"event_type": "goal.submitted", "tenant": "a", "goal_id": "g1"}', "schema_invalid"),
        (b"[1, 2]", "schema_invalid"),
        (b'{"event_type": ["goal.submitted"], "tenant": "a", "goal_id": "g"}', "unknown_event"),
        (b'{"event_type": {"x": 1}}', "unknown_event"),
        (b"", "poison"),
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


def redelivered(sent: tuple[str, bytes | None, bytes, dict[str, str]], offset: int) -> Delivery:
    """What the group's consumer reads back from the retry topic it was parked in."""
    topic, key, value, headers = sent
    return Delivery(topic, 0, offset, key, value, headers, 1_700_000_100_000, "t.orchestrator")


async def test_a_transient_failure_waits_in_retry_topics_then_is_dead_lettered_as_exhausted() -> None:
    attempts = 0

    async def flaky(event: Envelope, _: Delivery) -> list[Outgoing]:
        nonlocal attempts
        attempts += 1
        raise Retryable("model rate limited")

    pipe, producer = pipeline(flaky, attempts=3)
    await pipe.process(delivery(GOAL.to_bytes(), {"traceparent": TRACEPARENT}))
    [first] = producer.sent
    assert first[0] == "t.goals.retry.1"
    assert (first[1], first[2]) == (b"k1", GOAL.to_bytes())  # the message itself, unchanged
    assert first[3]["x-attempt"] == "2" and first[3]["x-retry-group"] == "t.orchestrator"
    assert first[3]["x-origin-topic"] == "t.goals" and first[3]["x-origin-offset"] == "41"

    started = time.monotonic()
    await pipe.process(redelivered(first, 0))  # waits out the backoff first
    assert time.monotonic() - started >= 0.05
    second = producer.sent[1]
    assert second[0] == "t.goals.retry.2" and second[3]["x-attempt"] == "3"

    await pipe.process(redelivered(second, 0))
    assert attempts == 3
    topic, key, value, headers = producer.sent[2]
    assert (topic, key, value) == ("t.goals.dlq", b"k1", GOAL.to_bytes())
    assert headers["x-dlq-reason"] == "retries_exhausted"
    assert headers["x-dlq-attempts"] == "3"
    assert headers["x-dlq-exception-class"] == "Retryable"
    assert headers["x-dlq-goal-id"] == "g1"
    assert (headers["x-dlq-original-topic"], headers["x-dlq-original-partition"], headers["x-dlq-original-offset"]) == ("t.goals", "2", "41")
    assert headers["traceparent"] == TRACEPARENT


async def test_a_retry_parked_by_another_group_is_left_to_that_group() -> None:
    pipe, producer = pipeline(echo)
    theirs = Delivery("t.goals.retry.1", 0, 3, b"k1", GOAL.to_bytes(), {"x-retry-group": "t.recorder", "x-attempt": "2"}, 0, "t.orchestrator")
    await pipe.process(theirs)
    assert producer.sent == []


async def test_a_transient_failure_on_the_retry_succeeds_and_produces_once() -> None:
    calls = 0

    async def once_flaky(event: Envelope, d: Delivery) -> list[Outgoing]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Retryable("tool timed out")
        return await echo(event, d)

    pipe, producer = pipeline(once_flaky)
    await pipe.process(delivery(GOAL.to_bytes()))
    await pipe.process(redelivered(producer.sent[0], 0))
    assert [s[0] for s in producer.sent] == ["t.goals.retry.1", "t.progress"]


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


def test_retry_and_dead_letter_topic_names_come_from_the_origin_topic() -> None:
    from schemas.topics import Topics

    assert Topics.retry("sb.goals", 1) == "sb.goals.retry.1"
    assert Topics.retry("sb.goals.retry.1", 2) == "sb.goals.retry.2"
    assert Topics.dlq("sb.goals.retry.3") == "sb.goals.dlq"
    assert Topics.origin("sb.agent.retry.writer") == "sb.agent.retry.writer"  # not a retry topic
    topics = Topics("sb", ("researcher",), retry_levels=2)
    assert topics.with_retries(("sb.tools",)) == ("sb.tools", "sb.tools.retry.1", "sb.tools.retry.2")
    assert "sb.tools.retry.2" in topics.all_topics() and "sb.tools.retry.3" not in topics.all_topics()


async def test_a_failure_that_knows_when_it_recovers_waits_at_least_that_long() -> None:
    async def circuit_open(event: Envelope, _: Delivery) -> list[Outgoing]:
        raise Retryable("circuit open for tool http_get", retry_after_s=0.15)

    pipe, producer = pipeline(circuit_open)  # backoff 0.05 s plus jitter of up to 0.05 s
    before_ms = time.time() * 1000
    await pipe.process(delivery(GOAL.to_bytes()))
    [(_, _, _, headers)] = producer.sent
    assert int(headers["x-retry-due-ms"]) >= int(before_ms) + 149  # whole milliseconds


async def test_a_dead_lettered_goal_event_tells_the_orchestrator_and_keeps_what_the_step_made() -> None:
    made = Outgoing("t.llm-calls", GoalSubmitted(tenant="acme", goal_id="g1", text="the paid-for call"), "g1")

    async def over_budget(event: Envelope, _: Delivery) -> list[Outgoing]:
        exc = BudgetExceeded("goal g1 reached max_tokens: limit 500, spent 612", "max_tokens", 500, 612)
        exc.outputs = [made]
        raise exc

    producer = RecordingProducer()
    sub = Subscription("t.agent.researcher", ("t.agent.researcher",), {GoalSubmitted: over_budget})  # type: ignore[dict-item]
    pipe = MessagePipeline(sub, producer, notify_topic="t.goals")
    await pipe.process(Delivery("t.agent.researcher", 1, 9, b"g1.r1", GOAL.to_bytes(), {}, 1_700_000_000_000, "t.agent.researcher"))
    assert [s[0] for s in producer.sent] == ["t.llm-calls", "t.agent.researcher.dlq", "t.goals"]
    notice = decode_event(producer.sent[2][2])
    assert isinstance(notice, WorkDeadLettered)
    assert (notice.goal_id, notice.reason, notice.figures) == ("g1", "budget_exceeded", {"limit": 500, "spent": 612})
    assert (notice.dlq_topic, notice.original_topic, notice.original_offset) == ("t.agent.researcher.dlq", "t.agent.researcher", 9)
    assert producer.sent[2][1] == b"g1"  # keyed by goal, like every event on the goals topic


async def test_a_handler_whose_goal_was_stopped_is_acked_with_no_outputs() -> None:
    async def stopped(event: Envelope, _: Delivery) -> list[Outgoing]:
        raise GoalStopped("g1", "max_tokens limit reached")

    pipe, producer = pipeline(stopped)
    await pipe.process(delivery(GOAL.to_bytes()))
    assert producer.sent == []


async def test_retry_headers_on_a_work_topic_are_ignored_so_nothing_is_silently_skipped() -> None:
    pipe, producer = pipeline(echo)
    forged = {"x-retry-group": "t.somebody-else", "x-retry-due-ms": str(int(time.time() * 1000) + 3_600_000)}
    async with asyncio.timeout(5):
        await pipe.process(delivery(GOAL.to_bytes(), forged))
    assert [s[0] for s in producer.sent] == ["t.progress"]


async def test_a_retry_never_waits_longer_than_the_longest_backoff() -> None:
    pipe, producer = pipeline(echo)  # longest backoff: 0.2 s plus 0.05 s of jitter
    far = {"x-retry-group": "t.orchestrator", "x-attempt": "2", "x-retry-due-ms": str(int(time.time() * 1000) + 3_600_000)}
    async with asyncio.timeout(5):  # not an hour
        await pipe.process(Delivery("t.goals.retry.1", 0, 1, b"k1", GOAL.to_bytes(), far, 0, "t.orchestrator"))
    assert [s[0] for s in producer.sent] == ["t.progress"]


# Requests a subscription requires signed are refused before their handler runs.

TOOL_REQUEST = ToolCallRequested(
    tenant="acme", goal_id="g7", task_id="g7.w1", call_id="c9", step_id="g7.w1:0", tool="calculator",
    arguments={"expression": "6*7"}, agent_kind="writer", reply_to="t.agent.writer",
)


def tools_pipeline(signer: Signer | None = None) -> tuple[MessagePipeline, RecordingProducer, list[Envelope]]:
    handled: list[Envelope] = []

    async def answer(event: Envelope, _: Delivery) -> list[Outgoing]:
        handled.append(event)
        return [Outgoing("t.agent.writer", event, event.task_id or event.goal_id)]

    producer = RecordingProducer()
    sub = Subscription(
        "t.tools", ("t.tools",), {ToolCallRequested: answer}, require_signature=frozenset({ToolCallRequested})
    )
    pipe = MessagePipeline(
        sub, producer, RetryPolicy(attempts=2, backoff_s=0.01), notify_topic="t.goals", signer=signer,
        audit_topic="t.audit",
    )
    return pipe, producer, handled


def tools_delivery(value: bytes, headers: dict[str, str]) -> Delivery:
    return Delivery("t.tools", 1, 7, b"g7.w1", value, {"traceparent": TRACEPARENT, **headers}, 1_700_000_000_000, "t.tools")


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("unsigned", {}),
        ("tampered", {SIGNATURE: Signer(DEVELOPMENT_KEY).sign(TOOL_REQUEST.model_copy(update={"tool": "save_note"}).to_bytes())}),
        ("another key", {SIGNATURE: Signer("not the key").sign(TOOL_REQUEST.to_bytes())}),
        ("garbage", {SIGNATURE: "v1=00"}),
    ],
)
async def test_an_unsigned_or_tampered_request_is_dead_lettered_as_tool_denied_and_audited(case: str, headers: dict[str, str]) -> None:
    pipe, producer, handled = tools_pipeline()
    await pipe.process(tools_delivery(TOOL_REQUEST.to_bytes(), headers))
    assert handled == [], "the handler never ran"
    by_topic = {topic: (key, value, h) for topic, key, value, h in producer.sent}
    assert set(by_topic) == {"t.audit", "t.tools.dlq", "t.goals"}, "no reply, only the refusal"

    key, value, dlq_headers = by_topic["t.tools.dlq"]
    assert (key, value) == (b"g7.w1", TOOL_REQUEST.to_bytes())
    assert dlq_headers["x-dlq-reason"] == "tool_denied"
    assert dlq_headers["x-dlq-exception-class"] == "ToolDenied"
    assert dlq_headers["x-dlq-goal-id"] == "g7" and dlq_headers["x-dlq-original-topic"] == "t.tools"

    key, value, audit_headers = by_topic["t.audit"]
    audit = decode_event(value)
    assert isinstance(audit, AuditRecorded) and key == b"g7"
    assert (audit.action, audit.actor, audit.subject) == ("tool.denied", "writer", "c9")
    assert audit.detail["tool"] == "calculator" and audit.detail["goal"] == "g7"
    assert audit.detail["reason"] == "tool_denied" and audit.detail["policy"] == "signature"
    assert Signer(DEVELOPMENT_KEY).verify(value, audit_headers[SIGNATURE]), "what the pipeline produces is signed"

    notice = decode_event(by_topic["t.goals"][1])
    assert isinstance(notice, WorkDeadLettered) and notice.reason == "tool_denied"  # the goal fails


async def test_a_signed_request_is_handled_and_every_output_is_signed() -> None:
    signer = Signer("deployment key")
    pipe, producer, handled = tools_pipeline(signer)
    value = TOOL_REQUEST.to_bytes()
    await pipe.process(tools_delivery(value, {SIGNATURE: signer.sign(value)}))
    assert handled == [TOOL_REQUEST]
    [(topic, _, out, headers)] = producer.sent
    assert topic == "t.agent.writer"
    assert signer.verify(out, headers[SIGNATURE])


async def test_a_signed_request_keeps_its_signature_through_a_retry() -> None:
    signer = Signer("deployment key")
    calls = 0

    async def flaky(event: Envelope, _: Delivery) -> list[Outgoing]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Retryable("slow down")
        return []

    producer = RecordingProducer()
    sub = Subscription("t.tools", ("t.tools",), {ToolCallRequested: flaky}, require_signature=frozenset({ToolCallRequested}))
    pipe = MessagePipeline(sub, producer, RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02), signer=signer, audit_topic="t.audit")
    value = TOOL_REQUEST.to_bytes()
    await pipe.process(tools_delivery(value, {SIGNATURE: signer.sign(value)}))
    [parked] = producer.sent
    assert parked[0] == "t.tools.retry.1"
    await pipe.process(redelivered(parked, 0))
    assert calls == 2 and len(producer.sent) == 1, "the retried request verified and was handled"


async def test_event_types_not_required_signed_are_handled_unsigned() -> None:
    pipe, producer = pipeline(echo)
    await pipe.process(delivery(GOAL.to_bytes(), {"traceparent": TRACEPARENT}))
    [(topic, _, _, _)] = producer.sent
    assert topic == "t.progress"
