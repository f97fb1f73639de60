"""The trace-propagation contract, on real Kafka and Redis: in an end-to-end goal, every message
produced on every topic carries a traceparent, all with the trace id of the goal's submission; and
the services' spans (agent steps, model calls, tool calls, consumed messages) are in that one trace."""

from __future__ import annotations

from collections import Counter

from faststream import TestApp
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from schemas.events import GoalCompleted, GoalSubmitted, LLMCallRecorded
from schemas.topics import Topics
from services.runtime.host import Settings, kafka_app
from services.runtime.tracecontext import new_traceparent, trace_id
from tests.integration.conftest import EVERY_SERVICE, KINDS
from tests.support.kafka import RawProducer, TopicWatch, eventually

SERVICES = EVERY_SERVICE
GROUPS = ("orchestrator", "agent.researcher", "agent.writer", "tools", "memory", "memory-recorder")


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


async def test_every_message_of_a_goal_carries_the_goal_s_trace_and_the_spans_follow_the_conventions(
    settings: Settings,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)  # this test's own; the global provider is never set
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ns = settings.platform.namespace
    t = Topics(ns, KINDS, retry_levels=settings.platform.retry_attempts - 1)
    goal = GoalSubmitted(tenant="acme", goal_id="g-traced", text="What is 12*7 and what is Apache Kafka?")
    submitted = new_traceparent()
    goal_trace = trace_id(submitted)

    async with (
        TestApp(kafka_app(SERVICES, settings, tracing=provider)),
        TopicWatch(settings.kafka, t.all_topics()) as watch,
        RawProducer(settings.kafka) as send,
    ):
        await send.send(t.goals, goal.to_bytes(), key=goal.goal_id, extra_headers={"traceparent": submitted})
        done = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=90)
        assert done.answer

        def consumed_by(group: str) -> list[ReadableSpan]:
            return [
                s for s in exporter.get_finished_spans()
                if s.kind is SpanKind.CONSUMER and attrs(s).get("messaging.consumer.group.name") == f"{ns}.{group}"
            ]

        async def every_group_traced() -> bool:
            # A consumer span ends just after its outputs are on their topics.
            await watch.caught_up()
            return all(consumed_by(group) for group in GROUPS)

        await eventually(every_group_traced, timeout=30)
        seen = await watch.caught_up()
        spans = list(exporter.get_finished_spans())

    # Every record on every topic of the namespace: a traceparent, with the submission's trace id.
    assert len(seen) > 20
    missing = [(s.topic, s.event and s.event.event_type) for s in seen if "traceparent" not in s.headers]
    assert missing == []
    assert {trace_id(s.headers["traceparent"]) for s in seen} == {goal_trace}

    # Every span of the services is in that trace, and every message they produced hangs under
    # the consumer span that produced it.
    assert {hex_ids(s)[0] for s in spans} == {goal_trace}
    consumer_spans = {hex_ids(s)[1] for s in spans if s.kind is SpanKind.CONSUMER}
    produced = [s for s in seen if s.headers["traceparent"] != submitted]
    assert produced and all(s.headers["traceparent"].split("-")[2] in consumer_spans for s in produced)

    # Consumed messages: CONSUMER spans with the group, the topic, the partition and the offset.
    for span in (s for s in spans if s.kind is SpanKind.CONSUMER):
        a = attrs(span)
        assert a["messaging.system"] == "kafka"
        assert str(a["messaging.consumer.group.name"]).removeprefix(f"{ns}.") in GROUPS
        assert span.name == f"process {Topics.origin(str(a['messaging.destination.name']))}"
        assert int(str(a["messaging.destination.partition.id"])) in range(settings.platform.partitions)
        assert isinstance(a["messaging.kafka.offset"], int)
    submissions = [s for s in spans if attrs(s).get("messaging.message.id") == goal.event_id]
    assert f"{ns}.orchestrator" in {attrs(s)["messaging.consumer.group.name"] for s in submissions}
    assert {f"{s.parent.span_id:016x}" for s in submissions if s.parent} == {submitted.split("-")[2]}
    assert all(s.parent and s.parent.is_remote for s in submissions)

    # Agent steps, model calls and tool calls, named by the GenAI conventions.
    names = Counter(s.name for s in spans)
    assert names["invoke_agent researcher"] > 0 and names["invoke_agent writer"] > 0
    assert names["execute_tool calculator"] > 0
    assert names["execute_tool kb_search"] > 0  # a memory tool, run on the memory service
    records = [s.event for s in seen if isinstance(s.event, LLMCallRecorded) and s.topic == t.llm_calls]
    chats = [s for s in spans if s.name == "chat offline/default"]
    assert len(chats) == len(records) > 0
    assert Counter((a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) for a in map(attrs, chats)) == Counter(
        (r.input_tokens, r.output_tokens) for r in records
    )
    assert {attrs(c)["gen_ai.provider.name"] for c in chats} == {"offline"}
    by_id = {hex_ids(s)[1]: s for s in spans}
    for chat in chats:  # an agent's model call is inside its step, which is inside its consumer span
        if attrs(chat)["switchboard.agent"] != "orchestrator":
            assert chat.parent is not None
            step = by_id[f"{chat.parent.span_id:016x}"]
            assert step.name == f"invoke_agent {attrs(chat)['switchboard.agent']}"
            assert step.parent is not None and by_id[f"{step.parent.span_id:016x}"].kind is SpanKind.CONSUMER
    # Content is off by default: no messages, no tool arguments or results on any span.
    content = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result"}
    assert not any(content & attrs(s).keys() for s in spans)
