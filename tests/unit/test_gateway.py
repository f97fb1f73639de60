"""The HTTP gateway's decisions, without servers: whose API key it is, what an event frame shows,
where a reconnecting client resumes and which repeats it is spared, what a goal's status says, and
what it publishes (signed). The streams and routes on real Kafka and Redis: tests/integration."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from typer.testing import CliRunner

from memory.keys import RedisKeys
from memory.timeline import TimelineEntry
from schemas.budget import BudgetLimits
from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalStateChanged,
    GoalSubmitted,
    LLMCallRecorded,
    ToolCallCompleted,
    decode_event,
)
from schemas.topics import Topics
from services.gateway import logic, stream
from services.gateway.app import create_app
from services.gateway.models import GoalFailure, GoalRequest
from services.gateway.settings import GatewaySettings
from services.ops.cli import app as cli
from services.runtime.budget import BudgetLedger
from services.runtime.errors import ConfigurationError, SwitchboardError
from services.runtime.goal_types import GoalTypes
from services.runtime.host import Settings
from services.runtime.settings import BudgetSettings, KafkaSettings, RedisSettings
from services.runtime.signing import SIGNATURE, Signer
from services.runtime.tracecontext import new_traceparent, trace_id

KEYS = {SecretStr("alpha-key"): "acme", SecretStr("beta-key"): "beta"}


# ---- API keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("presented", "tenant"),
    [("alpha-key", "acme"), ("beta-key", "beta"), ("alpha-ke", None), ("alpha-key ", None), ("", None), (None, None)],
)
def test_an_api_key_maps_to_its_tenant_and_nothing_else_does(presented: str | None, tenant: str | None) -> None:
    assert logic.ApiKeys(KEYS).tenant_for(presented) == tenant


def test_no_configured_keys_means_no_tenant() -> None:
    assert logic.ApiKeys({}).tenant_for("anything") is None


def test_api_keys_come_from_json_and_a_bad_tenant_is_named_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", '{"s3cret-key": "acme"}')
    assert logic.ApiKeys(GatewaySettings.from_env().api_keys).tenant_for("s3cret-key") == "acme"
    assert "s3cret-key" not in repr(GatewaySettings.from_env())

    monkeypatch.setenv("GATEWAY_API_KEYS", '{"s3cret-key": "not a tenant"}')
    with pytest.raises(ConfigurationError) as bad:
        GatewaySettings.from_env()
    assert "GATEWAY_API_KEYS" in str(bad.value) and "'not a tenant'" in str(bad.value)
    assert "s3cret-key" not in str(bad.value)

    monkeypatch.setenv("GATEWAY_API_KEYS", '{"s3cret-key": ')
    with pytest.raises(ConfigurationError, match="GATEWAY_API_KEYS is not JSON") as broken:
        GatewaySettings.from_env()
    assert "s3cret-key" not in str(broken.value)


def test_serve_gateway_refuses_to_start_without_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_API_KEYS", raising=False)
    result = CliRunner().invoke(cli, ["serve", "gateway"], env={"GATEWAY_API_KEYS": ""})
    assert result.exit_code == 2, result.output
    assert "GATEWAY_API_KEYS is not set" in result.output


# ---- event frames and resuming ----------------------------------------------------------------


def _entry(entry_id: str, event: Envelope) -> TimelineEntry:
    return TimelineEntry(entry_id, event.event_type, event.event_id, event.to_bytes())


GOAL = GoalSubmitted(tenant="acme", goal_id="g-1", text="What is 12*7?")
CALL = LLMCallRecorded(
    **GOAL.caused(), purpose="step", agent="researcher", model="offline/default", prompt_version="v1",
    prompt_hash="h", messages=[{"role": "user", "content": "secret prompt"}], response={"content": "secret answer"},
    input_tokens=30, output_tokens=7, cost_usd=0.002, latency_ms=12.0, step_id="s-1", instance="host:1",
    cache_hit=True,
)
TOOL = ToolCallCompleted(**GOAL.caused(), call_id="c-1", step_id="s-1", tool="calculator", ok=True, output="84")
DONE = GoalCompleted(**GOAL.caused(), answer="84")


def test_a_model_call_frame_has_its_figures_but_not_what_was_said() -> None:
    data = stream.frame_data(CALL.event_type, CALL.to_bytes())
    assert "messages" not in data and "response" not in data
    assert "secret" not in json.dumps(data)
    assert {k: data[k] for k in ("input_tokens", "output_tokens", "cost_usd", "model", "agent", "step_id", "cache_hit")} == {
        "input_tokens": 30, "output_tokens": 7, "cost_usd": 0.002, "model": "offline/default", "agent": "researcher",
        "step_id": "s-1", "cache_hit": True,
    }


def test_every_other_event_is_framed_as_recorded() -> None:
    assert decode_event(json.dumps(stream.frame_data(TOOL.event_type, TOOL.to_bytes())).encode()) == TOOL


@pytest.mark.parametrize(
    ("event", "ends"),
    [
        (DONE, True),
        (GoalFailed(**GOAL.caused(), reason="budget_exceeded"), True),
        (GoalStateChanged(**GOAL.caused(), from_state="running", to_state="cancelled", action="cancel", requested_by="x"), True),
        (GoalStateChanged(**GOAL.caused(), from_state="running", to_state="paused", action="pause", requested_by="x"), False),
        (TOOL, False),
        (GoalEscalated(**GOAL.caused(), reason="budget_exceeded", goal_text=GOAL.text), False),  # it waits
    ],
)
def test_the_stream_ends_with_the_goal(event: Envelope, ends: bool) -> None:
    assert stream.ends_goal(event.event_type, event.to_bytes()) is ends


@pytest.mark.parametrize(
    ("header", "cursor"), [(None, None), ("", None), ("  ", None), ("1718000000000-0", "1718000000000-0"), ("007-01", "7-1")],
)
def test_a_last_event_id_is_a_stream_id(header: str | None, cursor: str | None) -> None:
    assert stream.parse_last_event_id(header) == cursor


@pytest.mark.parametrize("header", ["yesterday", "17", "1-2-3", "-1-0", "1-x", f"{2**64}-0", "1_000-0"])
def test_anything_else_as_last_event_id_is_refused_with_what_ids_look_like(header: str) -> None:
    with pytest.raises(stream.InvalidLastEventId, match="ids look like '1718000000000-0'") as refused:
        stream.parse_last_event_id(header)
    assert isinstance(refused.value, SwitchboardError) and isinstance(refused.value, ValueError)


def test_an_event_recorded_twice_is_framed_once_across_a_reconnect() -> None:
    record = [
        _entry("1-0", GOAL), _entry("2-0", TOOL), _entry("3-0", GOAL), _entry("4-0", CALL),
        _entry("5-0", TOOL), _entry("6-0", DONE), _entry("7-0", DONE),
    ]
    # One connection, the whole record:
    once = [f.data["event_id"] for f in stream.frames(record, stream.SeenEvents())]
    assert once == [GOAL.event_id, TOOL.event_id, CALL.event_id, DONE.event_id]
    # The client had everything up to 3-0 (a repeat of the submission), then reconnected:
    resume = stream.resume_from(record[:3], "3-0")
    assert resume.cursor == "3-0" and not resume.ended
    rest = [f.id for f in stream.frames(record[3:], resume.seen)]
    assert rest == ["4-0", "6-0"]


def test_a_client_that_had_the_goals_end_has_nothing_more_to_get() -> None:
    record = [_entry("1-0", GOAL), _entry("2-0", DONE)]
    assert stream.resume_from(record, "2-0").ended
    assert not stream.resume_from(record[:1], "1-0").ended
    assert stream.resume_from([], None).cursor == stream.FIRST


# ---- publishing -------------------------------------------------------------------------------


async def test_what_the_gateway_publishes_is_signed_typed_and_traced(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    producer = Recorder()
    deps = _deps(redis, keys, topics, producer)
    parent = new_traceparent()
    await logic.publish(deps, topics.goals, GOAL.goal_id, GOAL, parent)  # in the approval's trace
    await logic.publish(deps, topics.goals, GOAL.goal_id, GOAL)  # a trace of its own
    [traced, fresh] = producer.sent
    assert traced.headers["event_type"] == "goal.submitted"
    assert Signer("unit-key").problem(traced.value, traced.headers) is None
    assert trace_id(traced.headers["traceparent"]) == trace_id(parent) and traced.headers["traceparent"] != parent
    assert trace_id(fresh.headers["traceparent"]) not in (None, trace_id(parent))


@dataclasses.dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]


class Recorder:
    """Stands in for the Kafka producer: keeps what was sent, or fails every send."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[Sent] = []
        self.fail = fail

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append(Sent(topic, key, value, dict(headers)))


def _deps(redis: Redis, keys: RedisKeys, topics: Topics, producer: Recorder) -> logic.GatewayDeps:
    settings = GatewaySettings(api_keys=KEYS)
    return logic.GatewayDeps(
        redis=redis, streams=redis, producer=producer, keys=keys, topics=topics, signer=Signer("unit-key"),
        ledger=BudgetLedger(redis, keys, BudgetSettings()), settings=settings, slots=logic.StreamSlots(1),
        goal_types=GoalTypes.load(),
    )


async def test_a_submitted_goal_is_published_signed_and_reads_as_submitted_at_once(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    producer = Recorder()
    deps = _deps(redis, keys, topics, producer)
    accepted, fresh = await logic.submit_goal(deps, "acme", GoalRequest(text="What is 12*7?", goal_type="lookup"))
    assert fresh

    assert (await logic.submit_goal(deps, "acme", GoalRequest(text="x", goal_type="lookup"), "retry-1"))[1]
    assert not (await logic.submit_goal(deps, "acme", GoalRequest(text="x", goal_type="lookup"), "retry-1"))[1]
    with pytest.raises(logic.UnknownGoalType, match="known goal types: \\['arithmetic', 'lookup', 'reviewed'\\]"):
        await logic.submit_goal(deps, "acme", GoalRequest(text="x", goal_type="astrology"))
    with pytest.raises(logic.OverCeiling, match="max_steps"):
        await logic.submit_goal(deps, "acme", GoalRequest(text="x", budget=BudgetLimits(max_steps=10**9)))

    [sent, _retried] = producer.sent  # the retry with the same Idempotency-Key published nothing
    event = decode_event(sent.value)
    assert isinstance(event, GoalSubmitted)
    assert (sent.topic, sent.key, event.goal_id, event.tenant, event.goal_type, event.submitted_by) == (
        topics.goals, accepted.goal_id.encode(), accepted.goal_id, "acme", "lookup", "gateway",
    )
    assert Signer("unit-key").verify(sent.value, sent.headers[SIGNATURE])
    status = await logic.goal_status(deps, "acme", accepted.goal_id)
    assert (status.state, status.text, status.goal_type, status.events) == (
        "submitted", "What is 12*7?", "lookup", f"/goals/{accepted.goal_id}/events",
    )
    with pytest.raises(logic.NotFound):
        await logic.goal_status(deps, "beta", accepted.goal_id)  # another tenant's goal is not found


async def test_a_goal_that_could_not_be_published_is_forgotten(redis: Redis, keys: RedisKeys, topics: Topics) -> None:
    deps = _deps(redis, keys, topics, Recorder(fail=True))
    with pytest.raises(ConnectionError):
        await logic.submit_goal(deps, "acme", GoalRequest(text="lost"))
    assert await redis.keys("*submission*") == []


async def test_status_shows_the_orchestrators_state_and_the_recorded_answer(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    deps = _deps(redis, keys, topics, Recorder())
    stored = {
        "status": "completed", "goal": GOAL.model_dump(mode="json"),
        "tasks": {"t1": {"task_id": "g-1.t1", "status": "completed", "planned": {"id": "t1", "kind": "researcher", "instruction": "What is 12*7", "depends_on": []}}},
    }
    await redis.set(keys.goal_state("acme", "g-1"), json.dumps(stored))
    answered = GoalCompleted(**GOAL.caused(), answer="84", path="human", answered_by="ops@gateway")
    for event in (GOAL, answered):
        await redis.xadd(keys.goal_stream("acme", "g-1"), {
            "event_type": event.event_type, "event_id": event.event_id, "payload": event.to_bytes(),
        })
    status = await logic.goal_status(deps, "acme", "g-1")
    assert (status.state, status.answer, status.path, status.answered_by, status.failure) == (
        "completed", "84", "human", "ops@gateway", None,
    )
    assert [(t.id, t.kind, t.status) for t in status.tasks] == [("t1", "researcher", "completed")]


def test_status_of_a_failed_goal_says_why() -> None:
    failed = GoalFailed(**GOAL.caused(), reason="budget_exceeded", detail="steps 2 of 2")
    view = logic.status_view("acme", "g-1", None, None, _entry("9-0", failed), None)
    assert (view.state, view.answer, view.failure) == ("failed", None, GoalFailure(reason="budget_exceeded", detail="steps 2 of 2"))


def test_an_answer_counts_only_for_the_request_it_answers() -> None:
    request_id = "r-1"
    changed = GoalStateChanged(**GOAL.caused(), from_state="running", to_state="paused", action="pause", requested_by="x")
    mine = GoalStateChanged(**{**changed.model_dump(), "event_id": "e-2", "causation_id": request_id})
    assert logic.answer_to(request_id, _entry("1-0", changed)) is None
    answer = logic.answer_to(request_id, _entry("2-0", mine))
    assert answer is not None and (answer.from_state, answer.to_state) == ("running", "paused")  # type: ignore[union-attr]


def test_a_replica_serves_a_bounded_number_of_streams() -> None:
    slots = logic.StreamSlots(1)
    give_back = slots.take()
    with pytest.raises(logic.Busy, match="already serves 1 event streams"):
        slots.take()
    give_back()
    give_back()  # the stream's end and the response's end both give it back: once
    assert slots.open == 0
    slots.take()
    assert slots.open == 1


# ---- the OpenAPI document ---------------------------------------------------------------------


def _offline_settings() -> Settings:
    # Nothing connects until the app's lifespan runs; these addresses are never dialled.
    return Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"), redis=RedisSettings(url="redis://127.0.0.1:1/0"))


def test_the_openapi_document_declares_the_api_key_and_the_errors_of_every_operation() -> None:
    document: dict[str, Any] = create_app(_offline_settings(), GatewaySettings(api_keys=KEYS)).openapi()
    assert document["components"]["securitySchemes"]["ApiKey"] | {"description": ""} == {
        "type": "apiKey", "in": "header", "name": "X-API-Key", "description": "",
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                assert "security" not in operation
                continue
            assert operation["security"] == [{"ApiKey": []}], f"{method} {path}"
            assert {"401", "503"} <= operation["responses"].keys(), f"{method} {path}"
            if "{goal_id}" in path or "{approval_id}" in path:
                assert "404" in operation["responses"], f"{method} {path}"
            if method == "post":
                assert {"400", "422"} <= operation["responses"].keys(), f"{method} {path}"


def test_the_gateway_will_not_be_built_without_api_keys() -> None:
    with pytest.raises(ConfigurationError, match="GATEWAY_API_KEYS is not set"):
        create_app(_offline_settings(), GatewaySettings())


async def test_every_answered_request_is_counted_by_route_template_method_and_status() -> None:
    import httpx

    from services.runtime.metrics import Metrics

    metrics = Metrics()
    app = create_app(_offline_settings(), GatewaySettings(api_keys=KEYS), metrics)
    # No lifespan: nothing connects; these requests are answered before any client is needed.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/goals/g-1")).status_code == 401
        assert (await client.get("/goals/g-2", headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await client.get("/nothing/here")).status_code == 404
    counted = {
        (route, method, status): metrics.value(
            "switchboard_gateway_requests_total", route=route, method=method, status=status,
        )
        for route, method, status in (
            ("/healthz", "GET", "200"), ("/goals/{goal_id}", "GET", "401"), ("unmatched", "GET", "404"),
        )
    }
    assert counted == {("/healthz", "GET", "200"): 1, ("/goals/{goal_id}", "GET", "401"): 2, ("unmatched", "GET", "404"): 1}
