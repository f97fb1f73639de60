"""The Prometheus metrics of one process, and the HTTP endpoint `switchboard serve` exposes them on.

Every metric lives in the `Metrics` object of its process (one per `Runtime`), in a registry of
its own rather than prometheus_client's global one, so two runtimes in one process (the tests)
never share a count. The metrics:

- `switchboard_steps_total{service,event_type,outcome}`: messages the pipeline finished. `service`
  is the consumer group without its namespace (`orchestrator`, `agent.researcher`, `tools`,
  `memory`, `memory-recorder`); `event_type` is the decoded event's type, `unknown` for a message
  that is not an event; `outcome` is `ok` (handled, outputs produced), `retried` (parked in a retry
  topic), `dead_lettered`, `skipped` (an observer passing over a message that is not an event) or
  `failed` (the pipeline itself raised: outputs could not be produced, a bug, or the work was
  abandoned at a rebalance; it is redelivered or dead-lettered by the consumer).
- `switchboard_step_seconds{service,event_type}`: histogram of the time from decoding a message to
  being done with it (a retried message's wait for its due time is not included).
- `switchboard_llm_calls_total{model,agent,purpose}`: model calls that returned, as recorded in
  `LLMCallRecorded`; `agent` is the agent kind, or `orchestrator`; `purpose` is plan, step or answer.
  A call answered from the response cache reached no model, so it is not counted here.
- `switchboard_llm_cache_hits_total{model,agent}`: calls answered from the response cache, and
  `switchboard_llm_saved_cost_usd_total{model,agent}` what they would have cost.
- `switchboard_llm_tokens_total{model,agent,direction}`: their tokens; `direction` is `input` or `output`.
- `switchboard_llm_cost_usd_total{model,agent}`: their cost in US dollars.
- `switchboard_tool_seconds{tool}`: histogram of the tools executor's tool calls, whatever their
  outcome, from the start of the call (a slot held) to its end.
- `switchboard_tool_errors_total{tool,kind}`: the calls that did not work: `usage` (the call was
  wrong and the agent is told so), `denied` (the tool's own policy), `failed` (the tool crashed),
  `transient` (5xx, connection), `timeout`, and `circuit_open` (refused by the breaker; not run).
- `switchboard_circuit_state{tool}`: the tool's circuit breaker in this process: 0 closed,
  1 half-open (its probe call is running), 2 open. An open circuit turns half-open at its next
  call after the reset time, so it reads 2 until then.
- `switchboard_dead_letters_total{service,topic,reason}`: records written to `<topic>.dlq`; `topic`
  is the work topic the message came from (its retry topics count as that topic), `reason` one of
  the dead-letter reasons.
- `switchboard_retries_total{service,topic,attempt}`: messages parked in `<topic>.retry.<attempt>`
  after their `attempt`-th attempt failed with a transient error.
- `switchboard_goal_outcomes_total{outcome}`: how goals end, and when their agents fail, what
  follows, counted as the orchestrator produces the event: `completed_by_agent`,
  `completed_by_fallback`, `completed_by_human`, `failed`, `cancelled`, `fallback_started`,
  `escalated`. A message redelivered after a crash re-produces its events, so a count may
  exceed the goals by that.
- `switchboard_gateway_requests_total{route,method,status}`: requests the HTTP gateway answered;
  `route` is the route's template (`/goals/{goal_id}`), `unmatched` for a path it does not serve.
- `switchboard_gateway_streams`: event streams and `?wait=true` requests the gateway has open.
- `switchboard_gateway_events_streamed_total`: server-sent events the gateway sent.

Every label value comes from a bounded set (the platform's own names), never from message
content, so a flood of odd messages cannot grow the series without limit. The process's own
`process_*`, `python_gc_*` and `python_info` series are served too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from threading import Thread
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalFallbackStarted,
    GoalStateChanged,
    LLMCallRecorded,
)
from services.runtime.errors import ConfigurationError

log = logging.getLogger("switchboard.metrics")

StepOutcome = Literal["ok", "retried", "dead_lettered", "skipped", "failed"]
ToolErrorKind = Literal["usage", "denied", "failed", "transient", "timeout", "circuit_open"]
NOT_AN_EVENT = "unknown"
"""The `event_type` label of a message that could not be decoded into an event."""
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Steps wait for model calls (seconds to a minute); tools have timeouts of seconds to minutes.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def goal_outcome(event: Envelope) -> str | None:
    """The `outcome` label of a goal-level event, or None for any other event."""
    match event:
        case GoalCompleted():
            return f"completed_by_{event.path}"
        case GoalFailed():
            return "failed"
        case GoalStateChanged() if event.to_state == "cancelled":
            return "cancelled"
        case GoalFallbackStarted():
            return "fallback_started"
        case GoalEscalated():
            return "escalated"
    return None


class Metrics:
    """The metrics of one process, in one registry. The hooks below are all the services call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        r = self.registry
        self.steps = Counter(
            "switchboard_steps_total", "Messages the pipeline finished, by outcome.",
            ["service", "event_type", "outcome"], registry=r,
        )
        self.step_seconds = Histogram(
            "switchboard_step_seconds", "Time the pipeline took over one message.",
            ["service", "event_type"], buckets=_BUCKETS, registry=r,
        )
        self.llm_calls = Counter(
            "switchboard_llm_calls_total", "Model calls that returned.", ["model", "agent", "purpose"], registry=r,
        )
        self.llm_tokens = Counter(
            "switchboard_llm_tokens_total", "Tokens of the model calls that returned.",
            ["model", "agent", "direction"], registry=r,
        )
        self.llm_cost = Counter(
            "switchboard_llm_cost_usd_total", "Cost of the model calls that returned, in US dollars.",
            ["model", "agent"], registry=r,
        )
        self.llm_cache_hits = Counter(
            "switchboard_llm_cache_hits_total", "Calls answered from the response cache (no model called).",
            ["model", "agent"], registry=r,
        )
        self.llm_saved_cost = Counter(
            "switchboard_llm_saved_cost_usd_total", "What the calls answered from the response cache would have cost.",
            ["model", "agent"], registry=r,
        )
        self.tool_seconds = Histogram(
            "switchboard_tool_seconds", "Duration of tool calls run by the tools executor.",
            ["tool"], buckets=_BUCKETS, registry=r,
        )
        self.tool_errors = Counter(
            "switchboard_tool_errors_total", "Tool calls that did not work, by kind.", ["tool", "kind"], registry=r,
        )
        self.circuit_state = Gauge(
            "switchboard_circuit_state", "Circuit breaker of each tool: 0 closed, 1 half-open, 2 open.",
            ["tool"], registry=r,
        )
        self.dead_letters = Counter(
            "switchboard_dead_letters_total", "Records written to dead-letter topics.",
            ["service", "topic", "reason"], registry=r,
        )
        self.retries = Counter(
            "switchboard_retries_total", "Messages parked in a retry topic after a transient failure.",
            ["service", "topic", "attempt"], registry=r,
        )
        self.gateway_requests = Counter(
            "switchboard_gateway_requests_total", "Requests the HTTP gateway answered.",
            ["route", "method", "status"], registry=r,
        )
        self.gateway_streams = Gauge(
            "switchboard_gateway_streams", "Event streams and waiting requests the HTTP gateway has open.", registry=r,
        )
        self.gateway_events = Counter(
            "switchboard_gateway_events_streamed_total", "Server-sent events the HTTP gateway sent.", registry=r,
        )
        self.goal_outcomes = Counter(
            "switchboard_goal_outcomes_total", "How goals end, and what follows when their agents fail.",
            ["outcome"], registry=r,
        )

    def step(self, service: str, event_type: str, outcome: StepOutcome, seconds: float) -> None:
        self.steps.labels(service, event_type, outcome).inc()
        self.step_seconds.labels(service, event_type).observe(seconds)

    def dead_letter(self, service: str, topic: str, reason: str) -> None:
        self.dead_letters.labels(service, topic, reason).inc()

    def retry(self, service: str, topic: str, attempt: int) -> None:
        self.retries.labels(service, topic, str(attempt)).inc()

    def produced(self, event: Envelope) -> None:
        """Counts a goal's ending or change of path among a handler's produced events."""
        outcome = goal_outcome(event)
        if outcome is not None:
            self.goal_outcomes.labels(outcome).inc()

    def gateway_request(self, route: str, method: str, status: int) -> None:
        self.gateway_requests.labels(route, method, str(status)).inc()

    def llm_call(self, record: LLMCallRecorded) -> None:
        if record.cache_hit:
            self.llm_cache_hits.labels(record.model, record.agent).inc()
            self.llm_saved_cost.labels(record.model, record.agent).inc(record.saved_cost_usd)
            return
        self.llm_calls.labels(record.model, record.agent, record.purpose).inc()
        self.llm_tokens.labels(record.model, record.agent, "input").inc(record.input_tokens)
        self.llm_tokens.labels(record.model, record.agent, "output").inc(record.output_tokens)
        self.llm_cost.labels(record.model, record.agent).inc(record.cost_usd)

    def tool_call(self, tool: str, seconds: float, error: ToolErrorKind | None = None) -> None:
        self.tool_seconds.labels(tool).observe(seconds)
        if error is not None:
            self.tool_error(tool, error)

    def tool_error(self, tool: str, kind: ToolErrorKind) -> None:
        self.tool_errors.labels(tool, kind).inc()

    def circuit(self, tool: str, state: str) -> None:
        self.circuit_state.labels(tool).set(CIRCUIT_STATES[state])

    def value(self, sample: str, **labels: str) -> float:
        """One sample's current value (0 when it has none yet), e.g.
        `value("switchboard_dead_letters_total", topic="sb.goals", reason="poison", service="orchestrator")`."""
        return self.registry.get_sample_value(sample, labels) or 0.0


@dataclass
class MetricsEndpoint:
    """The process's `GET /metrics`, served by prometheus_client's HTTP server on a thread of its own."""

    host: str
    server: WSGIServer
    thread: Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(
    metrics: Metrics | CollectorRegistry, host: str, port: int,
    remedy: str = "Set SWITCHBOARD_METRICS_PORT to a port that is free (each process on a machine needs its own), "
    "or to 0 to turn the endpoint off; SWITCHBOARD_METRICS_HOST is the address it listens on.",
) -> MetricsEndpoint | None:
    """Serve `metrics` (a process's, or any registry, e.g. the lag exporter's) on host:port; None
    when port is 0 (off). Raises ConfigurationError, saying `remedy`, when it cannot listen there."""
    if port == 0:
        return None
    registry = metrics.registry if isinstance(metrics, Metrics) else metrics
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigurationError(f"cannot serve metrics on {host}:{port} ({why}). {remedy}") from exc
    endpoint = MetricsEndpoint(host, server, thread)
    log.info("serving metrics on %s", endpoint.url)
    return endpoint
