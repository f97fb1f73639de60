"""The Prometheus endpoint after a known run on real Kafka and Redis: every service's steps, the
model calls, tokens and cost recorded on the llm-calls topic, the tool calls the executor ran,
and the one poison message dead-lettered."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx
import pytest
from faststream import TestApp
from prometheus_client.parser import text_string_to_metric_families

from schemas.envelope import Envelope
from schemas.events import AuditRecorded, GoalCompleted, GoalSubmitted, LLMCallRecorded, ToolCallRequested
from schemas.topics import Topics
from services.runtime.audit import TOOL_EXECUTED
from services.runtime.host import Settings, kafka_app
from services.runtime.metrics import Metrics, MetricsEndpoint, serve_metrics
from services.runtime.settings import LLMSettings
from tests.integration.conftest import EVERY_SERVICE, KINDS
from tests.support.kafka import RawProducer, Seen, TopicWatch, eventually

SERVICES = EVERY_SERVICE
GROUPS = ("orchestrator", "agent.researcher", "agent.writer", "tools", "memory", "memory-recorder")
Samples = list[tuple[str, dict[str, str], float]]
E = TypeVar("E", bound=Envelope)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@asynccontextmanager
async def serving_with_metrics(settings: Settings) -> AsyncIterator[MetricsEndpoint]:
    """The services in this process, as `switchboard serve all` runs them: one registry, served."""
    metrics = Metrics()
    endpoint = serve_metrics(metrics, settings.platform.metrics_host, settings.platform.metrics_port)
    assert endpoint is not None
    try:
        async with TestApp(kafka_app(SERVICES, settings, metrics=metrics)):
            yield endpoint
    finally:
        endpoint.close()


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=10)
    response.raise_for_status()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(response.text) for s in f.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for n, have, value in samples if n == name and labels.items() <= have.items())


def of(seen: list[Seen], kind: type[E], topic: str) -> list[E]:
    """The events of `kind` seen on `topic`."""
    return [s.event for s in seen if isinstance(s.event, kind) and s.topic == topic]


def executed_tool_calls(seen: list[Seen], topics: Topics) -> list[AuditRecorded]:
    """Tool calls that ran, per their audit: on the tools executor, and the memory tools (kb_search)
    on the memory service; not the ones a stored result answered."""
    sent = {r.call_id for r in of(seen, ToolCallRequested, topics.tools) + of(seen, ToolCallRequested, topics.memory)}
    return [
        a for a in of(seen, AuditRecorded, topics.audit)
        if a.action == TOOL_EXECUTED and a.subject in sent and not a.detail.get("replayed")
    ]


async def test_the_endpoint_serves_steps_llm_usage_tool_latency_and_dead_letters_of_a_known_run(
    settings: Settings,
) -> None:
    settings = dataclasses.replace(
        settings,
        platform=settings.platform.model_copy(update={"metrics_host": "127.0.0.1", "metrics_port": free_port()}),
        llm=LLMSettings(offline_cost_per_1k_tokens=0.002),
    )
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(tenant="acme", goal_id="g-metrics", text="What is 12*7 and what is Apache Kafka?")
    watched = [*t.with_retries(t.work_topics()), t.audit, *t.dlq_topics()]
    async with (
        serving_with_metrics(settings) as endpoint,
        TopicWatch(settings.kafka, watched) as watch,
        RawProducer(settings.kafka) as send,
    ):
        await send.send(t.goals, b"\x00\x01 this is not JSON", key="poison")
        await send.event(t.goals, goal)
        await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=90)
        await watch.wait_for(lambda s: Topics.is_dlq(s.topic))

        async def counted_everything_seen() -> bool:
            # A step is counted once it is done, just after its outputs are on their topics.
            seen = await watch.caught_up()
            samples = await scrape(endpoint.url)
            return (
                total(samples, "switchboard_llm_calls_total") == len(of(seen, LLMCallRecorded, t.llm_calls))
                and total(samples, "switchboard_tool_seconds_count") == len(executed_tool_calls(seen, t))
                and total(samples, "switchboard_dead_letters_total") == 1
                and all(total(samples, "switchboard_steps_total", service=g) > 0 for g in GROUPS)
                and all(
                    total(samples, "switchboard_steps_total", service=g)
                    == total(samples, "switchboard_step_seconds_count", service=g) for g in GROUPS
                )
            )

        await eventually(counted_everything_seen, timeout=30)
        samples = await scrape(endpoint.url)
        seen = await watch.caught_up()

    # Model calls, tokens and cost: exactly what the LLMCallRecorded events say, per model and agent.
    records = of(seen, LLMCallRecorded, t.llm_calls)
    assert {r.agent for r in records} == {"orchestrator", "researcher", "writer"}
    for model, agent in {(r.model, r.agent) for r in records}:
        mine = [r for r in records if (r.model, r.agent) == (model, agent)]
        labels = {"model": model, "agent": agent}
        for purpose in {r.purpose for r in mine}:
            calls = total(samples, "switchboard_llm_calls_total", **labels, purpose=purpose)
            assert calls == len([r for r in mine if r.purpose == purpose]), (agent, purpose)
        assert total(samples, "switchboard_llm_tokens_total", **labels, direction="input") == sum(r.input_tokens for r in mine)
        assert total(samples, "switchboard_llm_tokens_total", **labels, direction="output") == sum(r.output_tokens for r in mine)
        assert total(samples, "switchboard_llm_cost_usd_total", **labels) == pytest.approx(sum(r.cost_usd for r in mine))
    assert total(samples, "switchboard_llm_calls_total") == len(records) > 0
    assert total(samples, "switchboard_llm_cost_usd_total") > 0

    # Steps: every service handled messages, each one timed; the goal itself was one ok step.
    for group in GROUPS:
        steps = total(samples, "switchboard_steps_total", service=group)
        assert steps > 0, group
        assert total(samples, "switchboard_step_seconds_count", service=group) == steps, group
    assert total(samples, "switchboard_steps_total", service="orchestrator", event_type="goal.submitted", outcome="ok") == 1
    assert total(samples, "switchboard_steps_total", service="memory-recorder", event_type="unknown", outcome="skipped") == 1

    # Tools: one latency observation per call the executor ran; every breaker closed.
    executed = executed_tool_calls(seen, t)
    assert {a.detail["tool"] for a in executed} >= {"calculator", "save_note", "kb_search"}
    for tool in {a.detail["tool"] for a in executed}:
        runs = len([a for a in executed if a.detail["tool"] == tool])
        assert total(samples, "switchboard_tool_seconds_count", tool=str(tool)) == runs, tool
    assert total(samples, "switchboard_tool_seconds_count") == len(executed)
    circuits = {labels["tool"]: value for name, labels, value in samples if name == "switchboard_circuit_state"}
    assert circuits == {"calculator": 0, "http_get": 0, "save_note": 0, "arithmetic_answer": 0}
    assert total(samples, "switchboard_tool_errors_total") == 0

    # Dead letters and retries: the poison message, and as many retries as records on retry topics.
    poison = {"service": "orchestrator", "topic": t.goals, "reason": "poison"}
    assert total(samples, "switchboard_dead_letters_total", **poison) == 1
    assert total(samples, "switchboard_dead_letters_total") == 1
    assert total(samples, "switchboard_steps_total", service="orchestrator", event_type="unknown", outcome="dead_lettered") == 1
    retried = [s for s in seen if Topics.origin(s.topic) != s.topic]
    assert total(samples, "switchboard_retries_total") == len(retried)
