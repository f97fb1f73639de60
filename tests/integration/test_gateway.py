"""The HTTP gateway on the real broker and the real Redis: a goal submitted over HTTP runs through the
whole deployment; its progress streams as server-sent events, every event once, across reconnects;
its status and answer read back; tenants stay apart; and the OpenAPI document holds (Schemathesis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis.errors import Unsatisfiable
from hypothesis import settings as hypothesis_settings
from redis.asyncio import Redis
from schemathesis.core.result import Err
from schemathesis.python import asgi

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline, TimelineEntry
from schemas.envelope import Envelope
from schemas.events import GoalCompleted, GoalPlanned, GoalStateChanged, GoalSubmitted
from schemas.topics import Topics
from services.gateway.app import create_app
from services.runtime.host import Settings
from services.runtime.metrics import Metrics
from tests.integration.conftest import EVERY_SERVICE, KINDS, serving
from tests.support.gateway import DEFAULT, OTHER, gateway_settings, read_frames, running_gateway
from tests.support.kafka import TopicWatch, eventually

GOAL = "What is 12*7 and what is Apache Kafka?"


def timeline(redis: Redis, settings: Settings) -> GoalTimeline:
    return GoalTimeline(redis, RedisKeys(settings.platform.namespace), maxlen=10_000, ttl_s=3_600)


def through_end(record: list[TimelineEntry]) -> list[TimelineEntry]:
    """The record up to the goal's completion: what its event stream carries. (The record of the
    final model call may land after it: that call's topic is another partition's.)"""
    end = next(n for n, e in enumerate(record) if e.event_type == "goal.completed")
    return record[: end + 1]


async def submit(client: httpx.AsyncClient, text: str = GOAL) -> str:
    response = await client.post("/goals", json={"text": text})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "submitted" and body["events"] == f"/goals/{body['goal_id']}/events"
    return str(body["goal_id"])


async def test_a_client_receives_every_event_of_its_goal_in_order_until_it_completes(
    settings: Settings, redis: Redis
) -> None:
    t = Topics(settings.platform.namespace, KINDS)
    metrics = Metrics()
    async with (
        serving(EVERY_SERVICE, settings),
        running_gateway(settings, metrics) as url,
        TopicWatch(settings.kafka, [t.progress]) as watch,
        httpx.AsyncClient(base_url=url, headers=DEFAULT, timeout=30) as client,
    ):
        goal_id = await submit(client)
        frames = await read_frames(client, goal_id)

        async def stream_closed() -> bool:  # the server gives the stream's slot back once it has ended
            return metrics.value("switchboard_gateway_streams") == 0

        await eventually(stream_closed)
        await watch.event(GoalCompleted, goal_id=goal_id)
        progress = [s.event for s in await watch.caught_up() if s.event is not None and s.event.goal_id == goal_id]
    record = through_end(await timeline(redis, settings).read("default", goal_id))

    # Every event of the goal as the recorder stored it, once each, in its order, and nothing else.
    assert [(f.id, f.event, f.event_id) for f in frames] == [(e.entry_id, e.event_type, e.event_id) for e in record]
    assert frames[0].event == GoalSubmitted.model_fields["event_type"].default
    assert frames[-1].event == "goal.completed" and frames[-1].data["answer"]
    assert "84" in frames[-1].data["answer"]
    # The progress topic's events are all there, in the order the topic holds them.
    progress_ids = [e.event_id for e in progress]
    assert [f.event_id for f in frames if f.event_id in set(progress_ids)] == progress_ids
    assert isinstance(progress[0], GoalPlanned) and isinstance(progress[-1], GoalCompleted)
    # Model calls are there with their figures, without what was said.
    calls = [f.data for f in frames if f.event == "llm.call_recorded"]
    assert calls and all("messages" not in c and "response" not in c for c in calls)
    assert all({"input_tokens", "output_tokens", "cost_usd", "model", "agent"} <= c.keys() for c in calls)
    # The gateway's metrics count what it sent and answered.
    assert metrics.value("switchboard_gateway_events_streamed_total") == len(frames)
    assert metrics.value("switchboard_gateway_requests_total", route="/goals", method="POST", status="202") == 1
    assert metrics.value("switchboard_gateway_requests_total", route="/goals/{goal_id}/events", method="GET", status="200") == 1


async def test_a_client_that_reconnects_with_last_event_id_gets_every_event_exactly_once(
    settings: Settings, redis: Redis
) -> None:
    metrics = Metrics()
    async with (
        serving(EVERY_SERVICE, settings),
        running_gateway(settings, metrics) as url,
        httpx.AsyncClient(base_url=url, headers=DEFAULT, timeout=30) as client,
    ):
        goal_id = await submit(client)
        first = await read_frames(client, goal_id, limit=4)  # then the connection drops

        async def slot_given_back() -> bool:  # the server noticed the client left
            return metrics.value("switchboard_gateway_streams") == 0

        await eventually(slot_given_back)
        rest = await read_frames(client, goal_id, last_event_id=first[-1].id)
        # The goal's last event delivered: a reconnect gets 204, so an EventSource stops trying.
        done = await client.get(f"/goals/{goal_id}/events", headers={"Last-Event-ID": rest[-1].id})
    record = through_end(await timeline(redis, settings).read("default", goal_id))

    both = first + rest
    assert len(first) == 4 and rest
    assert [f.event_id for f in both] == [e.event_id for e in record]  # no gap, no repeat, in order
    assert len({f.event_id for f in both}) == len(both)
    assert done.status_code == 204


async def test_an_event_the_recorder_stored_twice_is_delivered_once_across_reconnects(
    settings: Settings, redis: Redis
) -> None:
    """The recorder is at-least-once: a redelivered event sits in the record twice. The test writes
    the record itself, so the repeats land exactly where they are hardest: before and after the
    id the client resumes from."""
    record = timeline(redis, settings)
    goal = GoalSubmitted(tenant="default", goal_id="g-twice", text="twice")
    paused = GoalStateChanged(**goal.caused(), from_state="running", to_state="paused", action="pause", requested_by="ops")
    resumed = GoalStateChanged(**goal.caused(), from_state="paused", to_state="running", action="resume", requested_by="ops")
    done = GoalCompleted(**goal.caused(), answer="done")

    async def append(event: Envelope) -> None:
        await record.append(event.tenant, event.goal_id, event.event_type, event.event_id, event.to_bytes())

    before: list[Envelope] = [goal, paused, goal, resumed]  # `goal` redelivered before the resume point
    for event in before:
        await append(event)
    async with running_gateway(settings) as url, httpx.AsyncClient(base_url=url, headers=DEFAULT, timeout=30) as client:
        first = await read_frames(client, goal.goal_id, limit=2)
        after: list[Envelope] = [paused, goal, resumed, done, done]  # redelivered after it, and the end twice
        for event in after:
            await append(event)
        rest = await read_frames(client, goal.goal_id, last_event_id=first[-1].id)

    assert [f.event_id for f in first + rest] == [goal.event_id, paused.event_id, resumed.event_id, done.event_id]


async def test_status_shows_submitted_then_the_answer_and_keeps_tenants_apart(settings: Settings) -> None:
    async with (
        running_gateway(settings, wait_timeout_s=60) as url,
        httpx.AsyncClient(base_url=url, headers=DEFAULT, timeout=90) as client,
    ):
        goal_id = await submit(client)
        # No orchestrator runs yet: the goal is known as submitted, not unknown.
        early = await client.get(f"/goals/{goal_id}")
        assert early.status_code == 200 and early.json()["state"] == "submitted"
        assert early.json()["text"] == GOAL

        async with serving(EVERY_SERVICE, settings):

            async def completed() -> dict[str, Any] | None:
                body = (await client.get(f"/goals/{goal_id}")).json()
                return body if body["state"] == "completed" and body["answer"] else None

            shown = await eventually(completed, timeout=120)
            # A completed goal cannot be cancelled: the orchestrator's refusal comes back.
            refused = await client.post(f"/goals/{goal_id}/cancel", params={"wait": "true"}, json={"reason": "late"})

        other = await client.get(f"/goals/{goal_id}", headers=OTHER)
        other_events = await client.get(f"/goals/{goal_id}/events", headers=OTHER)
        other_cancel = await client.post(f"/goals/{goal_id}/cancel", headers=OTHER)
        anonymous = await client.get(f"/goals/{goal_id}", headers={"X-API-Key": ""})
        wrong = await client.get(f"/goals/{goal_id}", headers={"X-API-Key": "key-nobody"})
        unknown = await client.get("/goals/g-nothing")
        bad_resume = await client.get(f"/goals/{goal_id}/events", headers={"Last-Event-ID": "yesterday"})
        bad_goal = await client.post("/goals", json={"text": "", "budget": {"max_steps": 0}})

    assert "84" in str(shown["answer"]) and shown["path"] == "agent" and shown["failure"] is None
    assert {task["status"] for task in shown["tasks"]} == {"completed"}
    assert shown["spent"]["steps"] >= 1
    assert refused.status_code == 409, refused.text
    assert "completed" in refused.json()["detail"] and refused.json()["state"] == "completed"
    assert (other.status_code, other_events.status_code, other_cancel.status_code) == (404, 404, 404)
    assert other.json() == {"detail": f"no goal {goal_id!r} for this API key's tenant"}
    assert anonymous.status_code == 401 and "missing API key" in anonymous.json()["detail"]
    assert wrong.status_code == 401 and "unknown API key" in wrong.json()["detail"]
    assert unknown.status_code == 404
    assert bad_resume.status_code == 400 and "Last-Event-ID" in bad_resume.json()["detail"]
    assert bad_goal.status_code == 422
    assert {tuple(e["loc"]) for e in bad_goal.json()["detail"]} == {("body", "text"), ("body", "budget", "max_steps")}


async def test_an_escalated_goal_shows_why_and_a_persons_answer_over_http_completes_it(settings: Settings) -> None:
    """A `reviewed` goal whose budget stops its agents waits for a person; the status says why and
    where to answer; the answer completes it, and the stream ends with it."""
    async with (
        serving(EVERY_SERVICE, settings),
        running_gateway(settings, wait_timeout_s=60) as url,
        httpx.AsyncClient(base_url=url, headers=DEFAULT, timeout=90) as client,
    ):
        submitted = await client.post(
            "/goals", json={"text": GOAL, "goal_type": "reviewed", "budget": {"max_steps": 2}},
        )
        assert submitted.status_code == 202, submitted.text
        goal_id = submitted.json()["goal_id"]

        async def escalated() -> dict[str, Any] | None:
            body = (await client.get(f"/goals/{goal_id}")).json()
            return body if body["state"] == "waiting_for_human" and body["escalation"] else None

        waiting = await eventually(escalated, timeout=120)
        assert waiting["escalation"]["reason"] == "budget_exceeded"
        assert waiting["escalation"]["answer_with"] == f"/goals/{goal_id}/answer"

        answered = await client.post(
            f"/goals/{goal_id}/answer", params={"wait": "true"}, json={"answer": "84; Kafka is an event log"},
        )
        assert answered.status_code == 200, answered.text
        assert (answered.json()["from_state"], answered.json()["to_state"]) == ("waiting_for_human", "completed")
        frames = await read_frames(client, goal_id)
        done = (await client.get(f"/goals/{goal_id}")).json()

    assert [f.event for f in frames][-1] == "goal.completed"
    assert "goal.escalated" in [f.event for f in frames]
    assert (done["state"], done["answer"], done["path"], done["answered_by"]) == (
        "completed", "84; Kafka is an event log", "human", "default@gateway",
    )


async def test_a_retried_submission_with_an_idempotency_key_is_one_goal_and_bad_goals_publish_nothing(
    settings: Settings,
) -> None:
    t = Topics(settings.platform.namespace, KINDS)
    async with (
        running_gateway(settings) as url,  # it creates the namespace's topics
        TopicWatch(settings.kafka, [t.goals]) as watch,
        httpx.AsyncClient(base_url=url, headers=DEFAULT, timeout=30) as client,
    ):
        retry = {"Idempotency-Key": "order-7"}
        first = await client.post("/goals", json={"text": GOAL}, headers=retry)
        again = await client.post("/goals", json={"text": GOAL}, headers=retry)
        theirs = await client.post("/goals", json={"text": GOAL}, headers={**retry, **OTHER})
        unknown_type = await client.post("/goals", json={"text": GOAL, "goal_type": "astrology"})
        too_big = await client.post("/goals", json={"text": GOAL, "budget": {"max_steps": 1_000_000}})
        await watch.caught_up()
        published = [s.event for s in watch.seen if isinstance(s.event, GoalSubmitted)]

    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["goal_id"] == again.json()["goal_id"]
    assert theirs.status_code == 202 and theirs.json()["goal_id"] != first.json()["goal_id"]  # keys are per tenant
    assert sorted(e.goal_id for e in published) == sorted([first.json()["goal_id"], theirs.json()["goal_id"]])
    assert unknown_type.status_code == 422
    [error] = unknown_type.json()["detail"]
    assert tuple(error["loc"]) == ("body", "goal_type") and "known goal types: ['arithmetic', 'lookup', 'reviewed']" in error["msg"]
    assert too_big.status_code == 403 and "max_steps" in too_big.json()["detail"]


# ---- the OpenAPI document, checked by Schemathesis ------------------------------------------------


@pytest.fixture
def gateway_api(settings: Settings) -> Iterator[schemathesis.BaseSchema]:
    """The gateway's OpenAPI document, its operations called in process (ASGI) on the test's real
    Kafka and Redis; the app's lifespan (producer, Redis pools) is closed after the test."""
    app = create_app(settings, gateway_settings())
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()


def test_every_operation_keeps_to_its_openapi_document_and_never_answers_5xx(
    gateway_api: schemathesis.BaseSchema,
) -> None:
    """Schemathesis' default checks on valid and invalid input for every operation: no 5xx,
    documented status codes, content types, headers and response schemas, invalid input rejected,
    valid input accepted, and the API key enforced. (Its pytest plugin's `from_fixture` does not
    run on pytest 9 yet, so each operation's Hypothesis test is built here.)"""
    failures: list[str] = []
    for result in gateway_api.get_all_operations():
        if isinstance(result, Err):
            failures.append(f"the document has an invalid operation: {result.err()}")
            continue
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @hypothesis_settings(
                max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
            )
            def conforms(case: schemathesis.Case[Any]) -> None:
                case.call_and_validate(headers=DEFAULT)

            try:
                conforms()
            except Unsatisfiable:
                continue  # nothing invalid to send: the operation takes no input
            except Exception as exc:  # noqa: BLE001 (every operation is checked; all failures are reported)
                failures.append(f"{operation.label} ({mode}): {exc}")
    assert not failures, "\n\n".join(failures)
