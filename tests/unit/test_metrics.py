"""The Prometheus metrics record what the pipeline, the LLM gateway and the tool limiter did, and the
endpoint serves them; each test reads a registry of its own."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalFallbackStarted,
    GoalStateChanged,
    GoalSubmitted,
    LLMCallRecorded,
)
from services.ops.cli import app
from services.runtime.bus import Delivery, Outgoing, Subscription
from services.runtime.errors import ConfigurationError, Retryable
from services.runtime.host import Settings, open_runtime
from services.runtime.llm import LLMGateway
from services.runtime.metrics import Metrics, serve_metrics
from services.runtime.pipeline import ATTEMPT, RETRY_GROUP, MessagePipeline, RetryPolicy
from services.runtime.prompts import Prompt
from services.runtime.settings import LLMSettings, PlatformSettings, RedisSettings
from services.tools.breaker import CircuitOpen
from services.tools.limits import ToolLimiter
from services.tools.registry import ToolFailed, ToolUsageError
from services.tools.settings import ToolsSettings

GOAL = GoalSubmitted(tenant="acme", goal_id="g1", text="What is 2+2")


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]) -> None:
        self.sent.append((topic, dict(headers)))


def delivery(value: bytes, topic: str = "t.goals", headers: dict[str, str] | None = None) -> Delivery:
    return Delivery(topic, 0, 7, b"g1", value, headers or {}, 1_700_000_000_000, "t.orchestrator")


def pipeline(handler: object, metrics: Metrics, attempts: int = 2) -> tuple[MessagePipeline, RecordingProducer]:
    producer = RecordingProducer()
    sub = Subscription("t.orchestrator", ("t.goals", "t.goals.retry.1"), {GoalSubmitted: handler})  # type: ignore[dict-item]
    retry = RetryPolicy(attempts=attempts, backoff_s=0.01, max_backoff_s=0.01)
    return MessagePipeline(sub, producer, retry, metrics=metrics, service="orchestrator"), producer


async def echo(event: Envelope, _: Delivery) -> list[Outgoing]:
    return [Outgoing("t.progress", event, event.goal_id)]


async def unavailable(event: Envelope, _: Delivery) -> list[Outgoing]:
    raise Retryable("redis blinked")


# The pipeline.


async def test_a_handled_event_counts_one_ok_step_and_its_latency() -> None:
    metrics = Metrics()
    pipe, producer = pipeline(echo, metrics)
    await pipe.process(delivery(GOAL.to_bytes()))
    assert [topic for topic, _ in producer.sent] == ["t.progress"]
    step = {"service": "orchestrator", "event_type": "goal.submitted"}
    assert metrics.value("switchboard_steps_total", **step, outcome="ok") == 1
    assert metrics.value("switchboard_step_seconds_count", **step) == 1
    assert metrics.value("switchboard_step_seconds_sum", **step) > 0


async def test_goal_endings_and_changes_of_path_are_counted_as_they_are_produced() -> None:
    metrics = Metrics()
    ends = [
        GoalCompleted(**GOAL.caused(), answer="4"),
        GoalCompleted(**GOAL.caused(), answer="4", path="fallback", fallback="arithmetic_answer"),
        GoalCompleted(**GOAL.caused(), answer="4", path="human", answered_by="ana"),
        GoalFailed(**GOAL.caused(), reason="runaway_loop"),
        GoalFallbackStarted(**GOAL.caused(), fallback="arithmetic_answer", reason="budget_exceeded"),
        GoalEscalated(**GOAL.caused(), reason="budget_exceeded", goal_text=GOAL.text),
        GoalStateChanged(**GOAL.caused(), from_state="running", to_state="cancelled", action="cancel", requested_by="ops"),
        GoalStateChanged(**GOAL.caused(), from_state="running", to_state="paused", action="pause", requested_by="ops"),
    ]

    async def ending(event: Envelope, _: Delivery) -> list[Outgoing]:
        return [Outgoing("t.progress", e, e.goal_id) for e in ends]

    pipe, producer = pipeline(ending, metrics)
    await pipe.process(delivery(GOAL.to_bytes()))
    assert len(producer.sent) == len(ends)
    counted = {
        outcome: metrics.value("switchboard_goal_outcomes_total", outcome=outcome)
        for outcome in ("completed_by_agent", "completed_by_fallback", "completed_by_human", "failed",
                        "fallback_started", "escalated", "cancelled")
    }
    assert counted == dict.fromkeys(counted, 1.0)  # a pause is no outcome


async def test_a_poison_message_counts_a_dead_letter_by_topic_and_reason() -> None:
    metrics = Metrics()
    pipe, producer = pipeline(echo, metrics)
    await pipe.process(delivery(b"\x00\x01 not JSON"))
    [(topic, headers)] = producer.sent
    assert (topic, headers["x-dlq-reason"]) == ("t.goals.dlq", "poison")
    assert metrics.value("switchboard_dead_letters_total", service="orchestrator", topic="t.goals", reason="poison") == 1
    assert metrics.value(
        "switchboard_steps_total", service="orchestrator", event_type="unknown", outcome="dead_lettered"
    ) == 1
    assert metrics.value("switchboard_steps_total", service="orchestrator", event_type="unknown", outcome="ok") == 0


async def test_a_transient_failure_counts_a_retry_then_a_dead_letter_of_the_origin_topic() -> None:
    metrics = Metrics()
    pipe, producer = pipeline(unavailable, metrics, attempts=2)
    await pipe.process(delivery(GOAL.to_bytes()))
    [(parked, headers)] = producer.sent
    assert parked == "t.goals.retry.1"
    assert metrics.value("switchboard_retries_total", service="orchestrator", topic="t.goals", attempt="1") == 1
    step = {"service": "orchestrator", "event_type": "goal.submitted"}
    assert metrics.value("switchboard_steps_total", **step, outcome="retried") == 1

    # The second attempt, read back from the retry topic, is the last.
    again = {ATTEMPT: headers[ATTEMPT], RETRY_GROUP: headers[RETRY_GROUP]}
    await pipe.process(delivery(GOAL.to_bytes(), topic="t.goals.retry.1", headers=again))
    assert producer.sent[-1][0] == "t.goals.dlq"
    assert metrics.value(
        "switchboard_dead_letters_total", service="orchestrator", topic="t.goals", reason="retries_exhausted"
    ) == 1
    assert metrics.value("switchboard_steps_total", **step, outcome="dead_lettered") == 1
    assert metrics.value("switchboard_retries_total", service="orchestrator", topic="t.goals", attempt="2") == 0
    assert metrics.value("switchboard_step_seconds_count", **step) == 2


async def test_an_observer_counts_what_it_skips_and_no_dead_letter() -> None:
    metrics = Metrics()
    producer = RecordingProducer()
    sub = Subscription("t.recorder", ("t.goals",), fallback=echo, observer=True)
    observer = MessagePipeline(sub, producer, metrics=metrics, service="recorder")
    await observer.process(delivery(b"not json"))
    assert producer.sent == []
    assert metrics.value("switchboard_steps_total", service="recorder", event_type="unknown", outcome="skipped") == 1
    assert metrics.value("switchboard_dead_letters_total", service="recorder", topic="t.goals", reason="poison") == 0


async def test_each_runtime_has_a_registry_of_its_own() -> None:
    settings = Settings(platform=PlatformSettings(namespace="unit"), redis=RedisSettings(url=None))
    async with open_runtime(settings) as first, open_runtime(settings) as second:
        first.metrics.dead_letter("orchestrator", "unit.goals", "poison")
        assert first.metrics is not second.metrics
        assert second.metrics.value(
            "switchboard_dead_letters_total", service="orchestrator", topic="unit.goals", reason="poison"
        ) == 0
        assert first.llm.metrics is first.metrics, "the gateway records into its runtime's metrics"


# The LLM gateway.


async def test_llm_calls_tokens_and_cost_are_counted_by_model_and_agent_as_recorded() -> None:
    metrics = Metrics()
    gateway = LLMGateway(LLMSettings(offline_cost_per_1k_tokens=0.5), {"offline/default"}, "test:1", metrics=metrics)
    prompt = Prompt("answer", "v1", "You answer.")
    records: list[LLMCallRecorded] = []
    for agent, question in (("orchestrator", "What is 2+2"), ("researcher", "What is 12*7"), ("researcher", "And 6*7")):
        messages = [{"role": "system", "content": prompt.text}, {"role": "user", "content": question}]
        done = await gateway.complete(
            model="offline/default", prompt=prompt, messages=messages, purpose="answer", agent=agent, cause=GOAL,
        )
        records.append(done.record)
    for agent in ("orchestrator", "researcher"):
        mine = [r for r in records if r.agent == agent]
        labels = {"model": "offline/default", "agent": agent}
        assert metrics.value("switchboard_llm_calls_total", **labels, purpose="answer") == len(mine)
        assert metrics.value("switchboard_llm_tokens_total", **labels, direction="input") == sum(r.input_tokens for r in mine)
        assert metrics.value("switchboard_llm_tokens_total", **labels, direction="output") == sum(r.output_tokens for r in mine)
        cost = sum(r.cost_usd for r in mine)
        assert cost > 0
        assert metrics.value("switchboard_llm_cost_usd_total", **labels) == pytest.approx(cost)


async def test_a_call_answered_from_the_cache_counts_as_a_hit_and_what_it_saved_not_as_a_model_call() -> None:
    from services.runtime.llm import response_cache

    metrics = Metrics()
    gateway = LLMGateway(
        LLMSettings(offline_cost_per_1k_tokens=0.5), {"offline/default"}, "test:1", metrics=metrics,
        cache=response_cache(None, "unit"),
    )
    prompt = Prompt("researcher", "v1", "You research.")
    messages = [{"role": "system", "content": prompt.text}, {"role": "user", "content": "What is 12*7"}]
    first, second = [
        await gateway.complete(
            model="offline/default", prompt=prompt, messages=messages, purpose="step", agent="researcher",
            cause=GOAL, cache=True,
        )
        for _ in range(2)
    ]
    assert second.record.cache_hit
    labels = {"model": "offline/default", "agent": "researcher"}
    assert metrics.value("switchboard_llm_calls_total", **labels, purpose="step") == 1
    assert metrics.value("switchboard_llm_cache_hits_total", **labels) == 1
    assert metrics.value("switchboard_llm_saved_cost_usd_total", **labels) == pytest.approx(first.record.cost_usd)


# The tools executor's limits.


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_the_circuit_gauge_follows_the_breaker_through_open_half_open_and_closed() -> None:
    metrics, clock = Metrics(), Clock()
    limits = ToolsSettings(limits={"calculator": {"breaker_failures": 2, "breaker_reset_s": 30}}).limits_for("calculator")
    limiter = ToolLimiter("calculator", limits, clock, metrics=metrics)

    def state() -> float:
        return metrics.value("switchboard_circuit_state", tool="calculator")

    assert state() == 0

    async def down() -> str:
        raise Retryable("upstream answered 503")

    for _ in range(2):
        with pytest.raises(Retryable):
            async with limiter.attempt() as attempt:
                await attempt.run(down)
    assert state() == 2
    with pytest.raises(CircuitOpen):
        async with limiter.attempt():
            pass
    assert metrics.value("switchboard_tool_errors_total", tool="calculator", kind="transient") == 2
    assert metrics.value("switchboard_tool_errors_total", tool="calculator", kind="circuit_open") == 1
    assert metrics.value("switchboard_tool_seconds_count", tool="calculator") == 2, "a refused call is not timed"

    clock.now += 30.1
    async with limiter.attempt() as probe:
        assert state() == 1, "half-open while its probe runs"

        async def works() -> str:
            return "2"

        assert await probe.run(works) == "2"
    assert state() == 0
    assert metrics.value("switchboard_tool_seconds_count", tool="calculator") == 3


async def test_tool_errors_are_counted_by_kind_and_every_call_is_timed() -> None:
    metrics = Metrics()
    limits = ToolsSettings(limits={"calculator": {"timeout_s": 0.05, "breaker_failures": 10}}).limits_for("calculator")
    limiter = ToolLimiter("calculator", limits, metrics=metrics)

    async def wrong() -> str:
        raise ToolUsageError("division by zero")

    async def stuck() -> str:
        await asyncio.Event().wait()
        return ""

    async def crash() -> str:
        raise RuntimeError("bug")

    for call, raised in ((wrong, ToolUsageError), (stuck, Retryable), (crash, ToolFailed)):
        with pytest.raises(raised):
            async with limiter.attempt() as attempt:
                await attempt.run(call)
    errors = {kind: metrics.value("switchboard_tool_errors_total", tool="calculator", kind=kind)
              for kind in ("usage", "timeout", "failed", "transient")}
    assert errors == {"usage": 1, "timeout": 1, "failed": 1, "transient": 0}
    assert metrics.value("switchboard_tool_seconds_count", tool="calculator") == 3
    assert metrics.value("switchboard_tool_seconds_sum", tool="calculator") >= 0.05


# The endpoint.


@contextmanager
def listening() -> Iterator[int]:
    """A port something already listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_endpoint_serves_the_registry_over_http() -> None:
    metrics = Metrics()
    metrics.dead_letter("orchestrator", "sb.goals", "poison")
    endpoint = serve_metrics(metrics, "127.0.0.1", free_port())
    assert endpoint is not None
    try:
        with urllib.request.urlopen(endpoint.url, timeout=5) as response:
            text = response.read().decode()
    finally:
        endpoint.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    poison = (("reason", "poison"), ("service", "orchestrator"), ("topic", "sb.goals"))
    assert samples[("switchboard_dead_letters_total", poison)] == 1
    assert any(name == "python_info" for name, _ in samples), "the process's own series come along"


def test_port_zero_turns_the_endpoint_off() -> None:
    assert serve_metrics(Metrics(), "127.0.0.1", 0) is None


def test_a_port_in_use_is_a_configuration_error_naming_the_setting() -> None:
    with listening() as port, pytest.raises(ConfigurationError, match="SWITCHBOARD_METRICS_PORT") as refused:
        serve_metrics(Metrics(), "127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(refused.value)


def test_the_lag_exporters_registry_on_a_port_in_use_says_what_to_change() -> None:
    from prometheus_client import CollectorRegistry

    with listening() as port, pytest.raises(ConfigurationError, match="--serve") as refused:
        serve_metrics(CollectorRegistry(), "127.0.0.1", port, remedy="Choose a free port with --serve.")
    assert f"127.0.0.1:{port}" in str(refused.value) and "SWITCHBOARD_METRICS_PORT" not in str(refused.value)


def test_serve_exits_with_the_setting_named_when_its_metrics_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on these: serve must stop at the metrics port, before it connects anywhere.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("SWITCHBOARD_METRICS_HOST", "127.0.0.1")
    with listening() as port:
        monkeypatch.setenv("SWITCHBOARD_METRICS_PORT", str(port))
        result = CliRunner().invoke(app, ["serve", "tools"])
    assert result.exit_code == 2, result.output
    assert "SWITCHBOARD_METRICS_PORT" in result.output and "Traceback" not in result.output
