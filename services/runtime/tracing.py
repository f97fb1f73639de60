"""OpenTelemetry traces: a goal is one trace across every hop, process and service.

Every consumed message is a CONSUMER span, a child of the span that produced it (its
`traceparent` header); every produced message carries the current span's `traceparent`. Agent
steps, model calls and tool calls are spans named by the GenAI semantic conventions. Spans are
always made, so the context propagates; they leave the process only when an OTLP endpoint is set,
and message content goes on them only when `SWITCHBOARD_TRACE_CONTENT` is on.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from pydantic_settings import BaseSettings

from schemas.envelope import Envelope
from schemas.topics import Topics
from services.runtime.bus import Delivery
from services.runtime.settings import settings_config
from services.runtime.tracecontext import new_traceparent, trace_id

TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()
_INSTRUMENTATION = "switchboard"

# Attribute names, as the semantic conventions spell them (messaging and GenAI, both "Development").
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_DESTINATION_PARTITION_ID = "messaging.destination.partition.id"
MESSAGING_CONSUMER_GROUP_NAME = "messaging.consumer.group.name"
MESSAGING_KAFKA_OFFSET = "messaging.kafka.offset"
MESSAGING_KAFKA_MESSAGE_KEY = "messaging.kafka.message.key"
MESSAGING_MESSAGE_ID = "messaging.message.id"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"
ERROR_TYPE = "error.type"

class TracingSettings(BaseSettings):
    model_config = settings_config("SWITCHBOARD_")

    otlp_endpoint: str | None = None
    """OTLP/HTTP endpoint of a collector, e.g. http://127.0.0.1:4318 (`/v1/traces` is appended
    unless it is there). Unset: spans are made, so traces propagate, but not exported."""
    trace_content: bool = False
    """Put prompts, completions and tool arguments and results on spans. Off: they never leave
    the process through traces."""


def tracer_provider(settings: TracingSettings, service: str, instance: str) -> TracerProvider:
    """The process's provider. Its owner shuts it down (which flushes the export)."""
    resource = Resource.create({"service.name": service, "service.instance.id": instance})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if settings.otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint))))
    return provider


def traces_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def extract(headers: Mapping[str, str]) -> Context:
    """The context a message was produced in (a new trace when it carries none, or an invalid one)."""
    return _PROPAGATOR.extract(headers)


def inject(headers: MutableMapping[str, str], consumed: Mapping[str, str]) -> None:
    """Put the current span's `traceparent` on a message about to be produced. Outside any span
    (a message set aside after the pipeline itself failed on it) the consumed message's is carried
    on, and a message that had none starts a trace: no message leaves without one."""
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(headers)
        return
    parent = consumed.get(TRACEPARENT)
    headers[TRACEPARENT] = parent if parent and trace_id(parent) else new_traceparent()


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


@dataclass(frozen=True)
class Tracing:
    """A process's tracer, handed to the pipeline, the LLM gateway and the tools executor."""

    tracer: Tracer
    content: bool = False
    """Whether message content (prompts, completions, tool arguments and results) goes on spans."""

    @classmethod
    def local(cls) -> Tracing:
        """Spans that propagate the context and are exported nowhere (the default of a library user)."""
        return cls(TracerProvider(shutdown_on_exit=False).get_tracer(_INSTRUMENTATION))

    @classmethod
    def of(cls, provider: trace.TracerProvider, content: bool = False) -> Tracing:
        return cls(provider.get_tracer(_INSTRUMENTATION), content)

    @contextmanager
    def processing(self, delivery: Delivery, messaging_system: str = "kafka") -> Iterator[Span]:
        """The CONSUMER span of one consumed message, a child of the span that produced it."""
        attributes: dict[str, AttributeValue] = {
            MESSAGING_SYSTEM: messaging_system,
            MESSAGING_OPERATION_NAME: "process",
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_DESTINATION_NAME: delivery.topic,
            MESSAGING_DESTINATION_PARTITION_ID: str(delivery.partition),
            MESSAGING_CONSUMER_GROUP_NAME: delivery.group,
            MESSAGING_KAFKA_OFFSET: delivery.offset,
        }
        if delivery.key:
            attributes[MESSAGING_KAFKA_MESSAGE_KEY] = delivery.key.decode(errors="replace")
        if Topics.origin(delivery.topic) != delivery.topic:
            attributes["switchboard.origin_topic"] = Topics.origin(delivery.topic)
        name = f"process {Topics.origin(delivery.topic)}"  # one name for a topic and its retry topics
        with self._span(name, SpanKind.CONSUMER, attributes, extract(delivery.headers)) as span:
            yield span

    @staticmethod
    def describe(span: Span, event: Envelope) -> None:
        """What the consumed event is; ids only, never its content."""
        span.set_attributes(
            {
                MESSAGING_MESSAGE_ID: event.event_id,
                "switchboard.event_type": event.event_type,
                "switchboard.tenant": event.tenant,
                "switchboard.goal_id": event.goal_id,
                **({"switchboard.task_id": event.task_id} if event.task_id else {}),
            }
        )

    @contextmanager
    def agent(self, kind: str, event: Envelope) -> Iterator[Span]:
        """`invoke_agent {kind}`: one step of an agent, in process (INTERNAL)."""
        attributes: dict[str, AttributeValue] = {GEN_AI_OPERATION_NAME: "invoke_agent", GEN_AI_AGENT_NAME: kind}
        if event.task_id:
            attributes[GEN_AI_CONVERSATION_ID] = event.task_id
        with self._span(f"invoke_agent {kind}", SpanKind.INTERNAL, attributes) as span:
            yield span

    @contextmanager
    def chat(
        self, model: str, provider: str, *, agent: str, purpose: str, prompt_version: str, messages: list[dict[str, Any]]
    ) -> Iterator[Span]:
        """`chat {model}`: one model call (CLIENT). `provider`: `gen_ai.provider.name`."""
        attributes: dict[str, AttributeValue] = {
            GEN_AI_OPERATION_NAME: "chat",
            GEN_AI_REQUEST_MODEL: model,
            GEN_AI_PROVIDER_NAME: provider,
            "switchboard.agent": agent,
            "switchboard.purpose": purpose,
            "switchboard.prompt_version": prompt_version,
        }
        if self.content:
            attributes[GEN_AI_INPUT_MESSAGES] = json.dumps([_message(m) for m in messages], default=str)
        with self._span(f"chat {model}", SpanKind.CLIENT, attributes) as span:
            yield span

    def chat_completed(
        self, span: Span, response: Any, answer: dict[str, Any], input_tokens: int, output_tokens: int, cost_usd: float
    ) -> None:
        """What a model call returned: usage and cost; the `answer` (the assistant message) only
        with content on."""
        choice = response.choices[0]
        attributes: dict[str, AttributeValue] = {
            GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
            GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
            "switchboard.cost_usd": cost_usd,
        }
        if getattr(response, "model", None):
            attributes[GEN_AI_RESPONSE_MODEL] = str(response.model)
        if getattr(response, "id", None):
            attributes[GEN_AI_RESPONSE_ID] = str(response.id)
        finish = getattr(choice, "finish_reason", None)
        if finish:
            attributes[GEN_AI_RESPONSE_FINISH_REASONS] = [str(finish)]
        if self.content:
            output = {**_message(answer), "finish_reason": str(finish or "stop")}
            attributes[GEN_AI_OUTPUT_MESSAGES] = json.dumps([output], default=str)
        span.set_attributes(attributes)

    @contextmanager
    def tool(
        self, tool: str, call_id: str, arguments: Any, scrub: Callable[[str], str] = str
    ) -> Iterator[Span]:
        """`execute_tool {tool}`: one run of a tool (INTERNAL). `scrub` removes secrets from what an
        error puts on the span (its message and stack trace)."""
        attributes: dict[str, AttributeValue] = {
            GEN_AI_OPERATION_NAME: "execute_tool", GEN_AI_TOOL_NAME: tool, GEN_AI_TOOL_CALL_ID: call_id,
        }
        if self.content:
            attributes[GEN_AI_TOOL_CALL_ARGUMENTS] = json.dumps(arguments, default=str)
        with self._span(f"execute_tool {tool}", SpanKind.INTERNAL, attributes, scrub=scrub) as span:
            yield span

    def tool_result(self, span: Span, output: str) -> None:
        if self.content:
            span.set_attribute(GEN_AI_TOOL_CALL_RESULT, output)

    @contextmanager
    def _span(
        self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue], context: Context | None = None,
        scrub: Callable[[str], str] = str,
    ) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
            name, context=context, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except Exception as exc:
                failed(span, exc, scrub=scrub)
                raise


def failed(span: Span, exc: BaseException, kind: str | None = None, scrub: Callable[[str], str] = str) -> None:
    """Mark a span failed: status ERROR, `error.type`, and an exception event, scrubbed."""
    message = scrub(str(exc))
    span.set_attribute(ERROR_TYPE, kind or type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, message[:1_000]))
    stack = scrub("".join(traceback.format_exception(exc)))
    span.record_exception(exc, {"exception.message": message, "exception.stacktrace": stack})


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-style chat message (as the gateway sends and records them) in the conventions'
    form: a role and typed parts."""
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if message.get("role") == "tool":
        parts.append({"type": "tool_call_response", "id": message.get("tool_call_id"), "response": content})
    elif isinstance(content, str) and content:
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):
        parts.extend({"type": "text", "content": p.get("text", "")} for p in content if isinstance(p, dict))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append(
            {"type": "tool_call", "id": call.get("id"), "name": function.get("name"), "arguments": _json(function.get("arguments"))}
        )
    return {"role": message.get("role", "user"), "parts": parts}


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
