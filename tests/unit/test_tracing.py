"""Traces: the consumed message's traceparent is the parent of its CONSUMER span, every output
carries that span's; agent steps, model calls and tool calls are GenAI spans; message content stays
off spans unless the setting turns it on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.envelope import Envelope
from schemas.events import GoalSubmitted, TaskAssigned, ToolCallCompleted, ToolCallRequested
from services.runtime.bus import Delivery, Outgoing, Subscription
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import Permanent
from services.runtime.idempotency import SideEffectGuard
from services.runtime.llm import LLMGateway, provider_name
from services.runtime.pipeline import MessagePipeline
from services.runtime.prompts import Prompt
from services.runtime.settings import LLMSettings
from services.runtime.tracecontext import trace_id
from services.runtime.tracing import Tracing, TracingSettings, current_traceparent, inject, tracer_provider, traces_url
from services.tools import logic, registry
from services.tools.limits import ToolLimiter
from services.tools.redaction import Redactor
from services.tools.settings import ToolsSettings
from tests.unit.test_pipeline import RecordingProducer

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT_SPAN}-01"
GOAL = GoalSubmitted(tenant="acme", goal_id="g1", text="What is 12*7?")
TASK = TaskAssigned(
    tenant="acme", goal_id="g1", task_id="g1.r1", kind="researcher", instruction="What is 12*7?", goal_text="What is 12*7?",
)
QUESTION = "What is 12*7? secret-question"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of this test only: a provider of its own, never the global one."""
    memory = InMemorySpanExporter()
    yield memory
    memory.clear()


def tracing(exporter: InMemorySpanExporter, content: bool = False) -> Tracing:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing.of(provider, content=content)


def named(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def parent_of(traceparent: str) -> str:
    return traceparent.split("-")[2]


def delivery(event: Envelope, topic: str = "t.goals", headers: dict[str, str] | None = None) -> Delivery:
    return Delivery(topic, 2, 41, b"g1", event.to_bytes(), {"traceparent": TRACEPARENT, **(headers or {})}, 1_700_000_000_000, "t.orchestrator")


async def echo(event: Envelope, _: Delivery) -> list[Outgoing]:
    return [Outgoing("t.progress", event, event.goal_id)]


# Propagation.


def test_an_output_carries_the_current_span_and_outside_any_span_the_consumed_message_s() -> None:
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")
    with tracer.start_as_current_span("step") as span:
        headers: dict[str, str] = {}
        inject(headers, {"traceparent": TRACEPARENT})
        context = span.get_span_context()
        assert headers["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
        assert current_traceparent() == headers["traceparent"]
    carried: dict[str, str] = {}
    inject(carried, {"traceparent": TRACEPARENT})
    assert carried["traceparent"] == TRACEPARENT
    fresh: dict[str, str] = {}
    inject(fresh, {"traceparent": "garbage"})
    assert trace_id(fresh["traceparent"]) not in (None, TRACE)
    assert current_traceparent() is None


def test_export_is_off_unless_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHBOARD_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("SWITCHBOARD_TRACE_CONTENT", raising=False)
    defaults = TracingSettings(_env_file=None)
    assert (defaults.otlp_endpoint, defaults.trace_content) == (None, False)
    quiet = tracer_provider(defaults, "switchboard-tools", "host:1")
    assert quiet.resource.attributes["service.name"] == "switchboard-tools"
    assert quiet.resource.attributes["service.instance.id"] == "host:1"
    assert not quiet._active_span_processor._span_processors  # no exporter at all
    monkeypatch.setenv("SWITCHBOARD_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("SWITCHBOARD_TRACE_CONTENT", "true")
    configured = TracingSettings(_env_file=None)
    assert (configured.otlp_endpoint, configured.trace_content) == ("http://collector:4318", True)
    exporting = tracer_provider(configured, "switchboard-tools", "host:1")
    assert len(exporting._active_span_processor._span_processors) == 1
    exporting.shutdown()
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"


# The pipeline.


async def test_a_handled_message_is_a_consumer_span_under_its_traceparent_and_its_outputs_carry_that_span(
    exporter: InMemorySpanExporter,
) -> None:
    producer = RecordingProducer()
    sub = Subscription("t.orchestrator", ("t.goals",), {GoalSubmitted: echo})
    await MessagePipeline(sub, producer, tracing=tracing(exporter)).process(delivery(GOAL))

    span = named(exporter, "process t.goals")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_SPAN
    assert span.context is not None and f"{span.context.trace_id:032x}" == TRACE
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "t.goals",
        "messaging.destination.partition.id": "2",
        "messaging.consumer.group.name": "t.orchestrator",
        "messaging.kafka.offset": 41,
        "messaging.kafka.message.key": "g1",
        "messaging.message.id": GOAL.event_id,
        "switchboard.event_type": "goal.submitted",
        "switchboard.tenant": "acme",
        "switchboard.goal_id": "g1",
        "switchboard.outcome": "ok",
    }
    [(_, _, _, headers)] = producer.sent
    assert trace_id(headers["traceparent"]) == TRACE
    assert parent_of(headers["traceparent"]) == span_id(span)


async def test_a_retried_message_keeps_its_traceparent_and_its_span_is_an_error(exporter: InMemorySpanExporter) -> None:
    async def flaky(event: Envelope, _: Delivery) -> list[Outgoing]:
        raise TimeoutError("model timed out")

    producer = RecordingProducer()
    sub = Subscription("t.orchestrator", ("t.goals",), {GoalSubmitted: flaky})
    await MessagePipeline(sub, producer, tracing=tracing(exporter)).process(delivery(GOAL))

    [(topic, _, _, headers)] = producer.sent
    assert topic == "t.goals.retry.1"
    assert headers["traceparent"] == TRACEPARENT  # the message is parked unchanged
    span = named(exporter, "process t.goals")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "TimeoutError"
    assert (span.attributes or {})["switchboard.outcome"] == "retried"


async def test_a_dead_letter_and_its_notice_stay_on_the_trace_and_the_span_names_the_reason(
    exporter: InMemorySpanExporter,
) -> None:
    async def broken(event: Envelope, _: Delivery) -> list[Outgoing]:
        raise Permanent("no such plan", reason="tool_failed")

    producer = RecordingProducer()
    sub = Subscription("t.orchestrator", ("t.goals",), {GoalSubmitted: broken})
    await MessagePipeline(sub, producer, notify_topic="t.goals", tracing=tracing(exporter)).process(delivery(GOAL))

    span = named(exporter, "process t.goals")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "tool_failed"
    assert [e.name for e in span.events] == ["exception"]
    sent = {topic: headers for topic, _, _, headers in producer.sent}
    assert sent["t.goals.dlq"]["traceparent"] == TRACEPARENT
    assert trace_id(sent["t.goals"]["traceparent"]) == TRACE
    assert parent_of(sent["t.goals"]["traceparent"]) == span_id(span)


async def test_an_agent_step_is_an_invoke_agent_span_inside_the_consumer_span(exporter: InMemorySpanExporter) -> None:
    sub = Subscription("t.agent.researcher", ("t.agent.researcher",), {TaskAssigned: echo}, agent="researcher")
    pipe = MessagePipeline(sub, RecordingProducer(), tracing=tracing(exporter))
    await pipe.process(delivery(TASK, topic="t.agent.researcher"))

    consumer = named(exporter, "process t.agent.researcher")
    agent = named(exporter, "invoke_agent researcher")
    assert agent.kind is SpanKind.INTERNAL
    assert agent.parent is not None and f"{agent.parent.span_id:016x}" == span_id(consumer)
    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "researcher", "gen_ai.conversation.id": "g1.r1",
    }
    assert (consumer.attributes or {})["switchboard.task_id"] == "g1.r1"


# The LLM gateway.


async def chat(exporter: InMemorySpanExporter, content: bool) -> tuple[ReadableSpan, int, int]:
    gateway = LLMGateway(LLMSettings(offline_cost_per_1k_tokens=0.5), {"offline/default"}, "test:1", tracing=tracing(exporter, content))
    prompt = Prompt("answer", "v3", "You answer.")
    messages = [{"role": "system", "content": prompt.text}, {"role": "user", "content": QUESTION}]
    with tracing(exporter).tracer.start_as_current_span("step"):
        done = await gateway.complete(
            model="offline/default", prompt=prompt, messages=messages, purpose="answer", agent="orchestrator", cause=GOAL,
        )
    span = named(exporter, "chat offline/default")
    assert span.parent is not None and f"{span.parent.span_id:016x}" == span_id(named(exporter, "step"))
    return span, done.record.input_tokens, done.record.output_tokens


async def test_a_model_call_is_a_chat_span_with_its_token_usage_and_no_content(exporter: InMemorySpanExporter) -> None:
    span, input_tokens, output_tokens = await chat(exporter, content=False)
    attributes = dict(span.attributes or {})
    assert span.kind is SpanKind.CLIENT
    assert input_tokens > 0 and output_tokens > 0
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "offline"
    assert attributes["gen_ai.request.model"] == "offline/default"
    assert attributes["gen_ai.usage.input_tokens"] == input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == output_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["switchboard.prompt_version"] == "answer.v3"
    assert attributes["switchboard.agent"] == "orchestrator"
    assert attributes["switchboard.cost_usd"] == pytest.approx((input_tokens + output_tokens) * 0.5 / 1000)
    assert "gen_ai.input.messages" not in attributes and "gen_ai.output.messages" not in attributes
    assert "secret-question" not in json.dumps({k: str(v) for k, v in attributes.items()})


async def test_with_content_on_the_chat_span_carries_the_messages_in_the_conventions_form(
    exporter: InMemorySpanExporter,
) -> None:
    span, _, _ = await chat(exporter, content=True)
    attributes = dict(span.attributes or {})
    sent = json.loads(str(attributes["gen_ai.input.messages"]))
    assert sent[1] == {"role": "user", "parts": [{"type": "text", "content": QUESTION}]}
    [answer] = json.loads(str(attributes["gen_ai.output.messages"]))
    assert answer["role"] == "assistant" and answer["finish_reason"] == "stop"
    assert answer["parts"][0]["type"] == "text" and answer["parts"][0]["content"]


def test_the_provider_is_litellm_s_in_the_conventions_spelling() -> None:
    assert provider_name("offline/default") == "offline"
    assert provider_name("gpt-4o") == "openai"
    assert provider_name("bedrock/anthropic.claude-3") == "aws.bedrock"
    assert provider_name("no-such-model") == "_OTHER"


# The tools executor.


def tools_deps(redis: Redis, sandbox: Path, exporter: InMemorySpanExporter, content: bool = False) -> logic.ToolsDeps:
    tools = {"calculator": registry.calculator(), "save_note": registry.save_note(sandbox)}
    limiters = {name: ToolLimiter(name, ToolsSettings().limits_for(name)) for name in tools}
    return logic.ToolsDeps(
        tools, limiters, AgentCatalogue.load(), SideEffectGuard(redis, RedisKeys("unit")), "unit.audit",
        redact=Redactor(["hunter2"]), tracing=tracing(exporter, content),
    )


def tool_request(expression: str) -> ToolCallRequested:
    return ToolCallRequested(
        tenant="acme", goal_id="g1", task_id="g1.r1", call_id="g1.r1:0:0", step_id="g1.r1:0", tool="calculator",
        arguments={"expression": expression}, agent_kind="researcher", reply_to="unit.agent.researcher",
    )


@pytest.mark.parametrize("content", [False, True])
async def test_a_tool_call_is_an_execute_tool_span_with_arguments_and_result_only_with_content_on(
    redis: Redis, tmp_path: Path, exporter: InMemorySpanExporter, content: bool
) -> None:
    [reply, _] = await logic.execute(tools_deps(redis, tmp_path, exporter, content), tool_request("12*7"))
    assert isinstance(reply.event, ToolCallCompleted) and reply.event.output == "12*7 = 84"
    span = named(exporter, "execute_tool calculator")
    attributes = dict(span.attributes or {})
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    assert {k: attributes[k] for k in ("gen_ai.operation.name", "gen_ai.tool.name", "gen_ai.tool.call.id")} == {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calculator", "gen_ai.tool.call.id": "g1.r1:0:0",
    }
    if content:
        assert json.loads(str(attributes["gen_ai.tool.call.arguments"])) == {"expression": "12*7"}
        assert attributes["gen_ai.tool.call.result"] == "12*7 = 84"
    else:
        assert "gen_ai.tool.call.arguments" not in attributes and "gen_ai.tool.call.result" not in attributes


async def test_a_failed_tool_call_is_an_error_span_with_its_exception_redacted(
    redis: Redis, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    [reply, _] = await logic.execute(tools_deps(redis, tmp_path, exporter), tool_request("hunter2 +"))
    assert isinstance(reply.event, ToolCallCompleted) and not reply.event.ok
    span = named(exporter, "execute_tool calculator")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "usage"
    [event] = span.events
    assert event.name == "exception"
    recorded = json.dumps({k: str(v) for k, v in (event.attributes or {}).items()})
    assert "hunter2" not in recorded and "[REDACTED]" in recorded


def test_no_test_here_touched_the_global_tracer_provider() -> None:
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
