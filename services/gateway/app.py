"""HTTP gateway wiring (`switchboard serve gateway`): the FastAPI routes, the API key check, and the
Redis clients and Kafka producer the lifespan opens and closes. Each route makes one call into
logic.py; the events stream (server-sent events) follows the goal's record via stream.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import uvicorn
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from memory.keys import RedisKeys
from schemas.events import LifecycleRequest as LifecycleVerb
from schemas.topics import Topics
from services.gateway import logic, stream
from services.gateway.models import (
    APPROVAL_ID,
    GOAL_ID,
    AnswerRequest,
    ApprovalSent,
    ApproveRequest,
    DenyRequest,
    GoalAccepted,
    GoalRequest,
    GoalStatus,
    Health,
    LifecycleRequest,
    PendingApproval,
    Problem,
    RequestAccepted,
    RequestRejected,
    StateChanged,
)
from services.gateway.settings import GatewaySettings
from services.runtime.budget import BudgetLedger
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError
from services.runtime.goal_types import GoalTypes
from services.runtime.host import Settings
from services.runtime.kafka_bus import RecordSender, ensure_topics
from services.runtime.metrics import Metrics, MetricsEndpoint, serve_metrics
from services.runtime.signing import Signer

log = logging.getLogger("switchboard.gateway")

API_KEY = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="ApiKey",
    description='An API key from GATEWAY_API_KEYS; it decides the tenant the request acts for.',
)
GoalId = Annotated[str, Path(pattern=GOAL_ID, description="The goal's id, as POST /goals returned it.")]
ApprovalId = Annotated[str, Path(pattern=APPROVAL_ID, description="From GET /approvals.")]
Wait = Annotated[bool, Query(description="Wait (a bounded time) for the orchestrator's answer.")]


Responses = dict[int | str, dict[str, Any]]
"""Documented responses of an operation, by status code (FastAPI's `responses=`)."""


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


UNAUTHORIZED: Responses = {401: _problem("No API key, or one that is not configured.")}
UNAVAILABLE: Responses = {503: _problem("Kafka or Redis cannot be reached, or this replica is too busy; try again.")}
GOAL_NOT_FOUND: Responses = {404: _problem("No such goal for the key's tenant.")}
BAD_BODY: Responses = {400: _problem("The body could not be parsed (it is not UTF-8 JSON).")}
ANSWERS: Responses = {
    200: {"model": StateChanged, "description": "With wait=true: the goal's state changed."},
    409: {"model": RequestRejected, "description": "With wait=true: the goal's state does not allow it."},
}


def create_app(settings: Settings, gateway: GatewaySettings, metrics: Metrics | None = None) -> FastAPI:
    """The gateway's ASGI app; it counts its requests and streams in `metrics` (the process's).
    Raises ConfigurationError when it could not serve anyone: no API keys, no Redis URL, no
    Kafka, or a broken agent catalogue."""
    metrics = metrics or Metrics()
    if not gateway.api_keys:
        raise ConfigurationError(
            'GATEWAY_API_KEYS is not set: the gateway serves only requests with an API key. Set it to a JSON '
            'object of keys and their tenants, e.g. GATEWAY_API_KEYS=\'{"<a long random key>": "default"}\''
        )
    if not settings.redis.url:
        raise ConfigurationError("REDIS_URL is not set: the gateway reads goals from the deployment's Redis.")
    settings.kafka.require()  # no Kafka: nothing could be published
    platform = settings.platform
    catalogue = AgentCatalogue.load(platform.agents_dir)
    goal_types = GoalTypes.load(platform.goal_types_dir)
    topics = Topics(platform.namespace, catalogue.names, retry_levels=platform.retry_attempts - 1)
    keys = RedisKeys(platform.namespace)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url, redis_settings = settings.redis.url or "", settings.redis
        requests = Redis.from_pool(BlockingConnectionPool.from_url(
            url, max_connections=redis_settings.max_connections, timeout=redis_settings.pool_timeout_s,
        ))
        streams = Redis.from_pool(BlockingConnectionPool.from_url(
            url, max_connections=gateway.max_streams, timeout=redis_settings.pool_timeout_s,
        ))
        try:
            await ensure_topics(settings.kafka, topics.all_topics(), platform.partitions)
            async with RecordSender(settings.kafka, client_id="switchboard-gateway") as producer:
                app.state.deps = logic.GatewayDeps(
                    redis=requests, streams=streams, producer=producer, keys=keys, topics=topics,
                    signer=Signer.from_setting(platform.signing_key), ledger=BudgetLedger(requests, keys, settings.budget),
                    settings=gateway, slots=logic.StreamSlots(gateway.max_streams, metrics=metrics),
                    goal_types=goal_types, metrics=metrics,
                )
                yield
        finally:
            await streams.aclose()
            await requests.aclose()

    app = FastAPI(
        title="Switchboard gateway",
        summary="Submit goals, follow them as server-sent events, steer them, and settle approvals.",
        version="1",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.api_keys = logic.ApiKeys(gateway.api_keys)
    app.state.metrics = metrics
    _errors(app)
    _count_requests(app, metrics)
    app.include_router(routes)
    _document_goal_types(app, sorted(goal_types.types))
    return app


def _document_goal_types(app: FastAPI, names: list[str]) -> None:
    """The OpenAPI document lists the goal types this deployment configures (a directory of TOML
    files, so not known to the static request model) as `goal_type`'s allowed values."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            field = schema["components"]["schemas"]["GoalRequest"]["properties"]["goal_type"]
            field["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}] if names else [{"type": "null"}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _count_requests(app: FastAPI, metrics: Metrics) -> None:
    """Every answered request, by its route's template, method and status (a crash counts as 500)."""

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            metrics.gateway_request(getattr(route, "path", "unmatched"), request.method, status)


def _errors(app: FastAPI) -> None:
    """Errors the gateway expects, as `{"detail": ...}` with their status; never a 500."""

    def answer(status: int, headers: dict[str, str] | None = None) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handle(request: Request, exc: Exception) -> Response:
            return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

        return handle

    async def redis_down(request: Request, exc: Exception) -> Response:
        log.warning("Redis unavailable for %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "Redis is unavailable; try again shortly."}, status_code=503,
                            headers={"Retry-After": "5"})

    async def kafka_down(request: Request, exc: Exception) -> Response:
        log.warning("Kafka unavailable for %s %s: %r", request.method, request.url.path, exc)
        return JSONResponse({"detail": "Kafka is unavailable; nothing was published. Try again shortly."},
                            status_code=503, headers={"Retry-After": "5"})

    app.add_exception_handler(logic.Unauthorized, answer(401, {"WWW-Authenticate": "ApiKey"}))
    app.add_exception_handler(logic.NotFound, answer(404))
    app.add_exception_handler(logic.OverCeiling, answer(403))
    app.add_exception_handler(stream.InvalidLastEventId, answer(400))
    app.add_exception_handler(logic.Busy, answer(503, {"Retry-After": "5"}))
    app.add_exception_handler(RedisConnectionError, redis_down)
    app.add_exception_handler(RedisTimeoutError, redis_down)
    app.add_exception_handler(KafkaError, kafka_down)


def _deps(request: Request) -> logic.GatewayDeps:
    deps: logic.GatewayDeps = request.app.state.deps
    return deps


async def _tenant(request: Request, key: Annotated[str | None, Security(API_KEY)]) -> str:
    keys: logic.ApiKeys = request.app.state.api_keys
    found = keys.tenant_for(key)
    if found is None:
        raise logic.Unauthorized("missing API key (header X-API-Key)" if not key else "unknown API key (header X-API-Key)")
    return found


Deps = Annotated[logic.GatewayDeps, Depends(_deps)]
Tenant = Annotated[str, Depends(_tenant)]
routes = APIRouter()


@routes.get("/healthz", tags=["ops"])
async def healthz() -> Health:
    """Liveness: the process serves requests (no API key needed)."""
    return Health()


@routes.post(
    "/goals", status_code=202, tags=["goals"],
    responses={
        200: {"model": GoalAccepted, "description": "Submitted before with this Idempotency-Key: the same goal."},
        **BAD_BODY, **UNAUTHORIZED, **UNAVAILABLE,
        403: _problem("The budget asks for more than the tenant's policy allows."),
    },
)
async def submit(
    body: GoalRequest, tenant: Tenant, deps: Deps, response: Response,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=200,
        description="Retrying with the same key answers with the same goal instead of starting another.",
    )] = None,
) -> GoalAccepted:
    """Submit a goal: it is published to the orchestrator. Follow it at `events`. Its `goal_type`
    must be one the deployment configures (the document lists them); a budget above the tenant's
    policy is refused (403)."""
    try:
        accepted, fresh = await logic.submit_goal(deps, tenant, body, idempotency_key)
    except logic.UnknownGoalType as exc:  # in the shape of FastAPI's own validation errors
        raise RequestValidationError(
            [{"type": "enum", "loc": ("body", "goal_type"), "msg": str(exc), "input": body.goal_type}]
        ) from exc
    response.headers["Location"] = f"/goals/{accepted.goal_id}"
    if not fresh:
        response.status_code = 200
    return accepted


@routes.get("/goals/{goal_id}", tags=["goals"], responses={**UNAUTHORIZED, **GOAL_NOT_FOUND, **UNAVAILABLE})
async def status(goal_id: GoalId, tenant: Tenant, deps: Deps) -> GoalStatus:
    """The goal's state, tasks, spending, and its answer or why it failed."""
    return await logic.goal_status(deps, tenant, goal_id)


@routes.get(
    "/goals/{goal_id}/events", tags=["goals"], response_class=EventSourceResponse,
    responses={
        200: {"description": "The goal's events as server-sent events, until it completes, fails or is "
                             "cancelled (`id:` stream entry id, `event:` event type, `data:` the event as JSON; "
                             "model calls without their messages and response).",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        204: {"description": "The client has had every event up to the goal's end (Last-Event-ID): nothing "
                             "more will come, so an EventSource stops reconnecting."},
        400: _problem("Last-Event-ID is not an id this stream gave."),
        **UNAUTHORIZED, **GOAL_NOT_FOUND, **UNAVAILABLE,
    },
)
async def events(
    goal_id: GoalId, tenant: Tenant, deps: Deps,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", description="Resume after this event (as an EventSource does on reconnect).",
    )] = None,
) -> Response:
    """Stream the goal's progress. Reconnect with Last-Event-ID to continue with no gap and no repeat."""
    await logic.require_goal(deps, tenant, goal_id)
    last = stream.parse_last_event_id(last_event_id)
    key = deps.keys.goal_stream(tenant, goal_id)
    resume = stream.resume_from(await stream.read_through(deps.redis, key, last) if last else [], last)
    if resume.ended:
        return Response(status_code=204)
    # The slot is taken here, so a burst of requests cannot all pass a check before any takes one;
    # it is given back when the stream ends, or, if the stream never started (the client left
    # first), when the response is done.
    give_back = deps.slots.take()
    return EventSourceResponse(
        _frames(deps, key, resume, give_back), ping=deps.settings.ping_s, background=BackgroundTask(give_back),
    )


def _lifecycle_route(verb: LifecycleVerb, description: str) -> None:
    async def change(
        goal_id: GoalId, tenant: Tenant, deps: Deps,
        body: Annotated[LifecycleRequest | None, Body()] = None, wait: Wait = False,
    ) -> Any:
        reason = body.reason if body else ""
        return _answered(await logic.change_goal(deps, tenant, goal_id, verb, reason, wait))

    routes.post(
        f"/goals/{{goal_id}}/{verb}", status_code=202, tags=["goals"], response_model=RequestAccepted,
        responses={**ANSWERS, **BAD_BODY, **UNAUTHORIZED, **GOAL_NOT_FOUND, **UNAVAILABLE},
        summary=verb.capitalize(), description=description, name=verb,
    )(change)


_lifecycle_route("cancel", "Cancel the goal: every task stops at its next step; calls in flight finish.")
_lifecycle_route("pause", "Pause a running goal: its tasks stop at their next step and keep their checkpoints.")
_lifecycle_route("resume", "Resume a paused goal: its tasks continue from their checkpoints.")


@routes.post(
    "/goals/{goal_id}/answer", status_code=202, tags=["goals"], response_model=RequestAccepted,
    responses={**ANSWERS, **BAD_BODY, **UNAUTHORIZED, **GOAL_NOT_FOUND, **UNAVAILABLE},
)
async def answer(goal_id: GoalId, body: AnswerRequest, tenant: Tenant, deps: Deps, wait: Wait = False) -> Any:
    """A person's answer to a goal waiting for one (state `waiting_for_human`): it completes with it."""
    return _answered(await logic.answer_goal(deps, tenant, goal_id, body.answer, wait))


@routes.get("/approvals", tags=["approvals"], responses={**UNAUTHORIZED, **UNAVAILABLE})
async def approvals(tenant: Tenant, deps: Deps) -> list[PendingApproval]:
    """The tenant's tool calls waiting for a person's decision, soonest to expire first."""
    return await logic.pending_approvals(deps, tenant)


APPROVAL_ERRORS: Responses = {**BAD_BODY, **UNAUTHORIZED, 404: _problem("No tool call of the key's tenant waits under this id."), **UNAVAILABLE}


@routes.post("/approvals/{approval_id}/approve", status_code=202, tags=["approvals"], responses=APPROVAL_ERRORS)
async def approve(
    approval_id: ApprovalId, tenant: Tenant, deps: Deps, body: Annotated[ApproveRequest | None, Body()] = None,
) -> ApprovalSent:
    """Approve a waiting tool call: the tools executor runs it and the task goes on. Audited."""
    return await logic.decide_approval(deps, tenant, approval_id, True, body.reason if body else "")


@routes.post("/approvals/{approval_id}/deny", status_code=202, tags=["approvals"], responses=APPROVAL_ERRORS)
async def deny(approval_id: ApprovalId, body: DenyRequest, tenant: Tenant, deps: Deps) -> ApprovalSent:
    """Deny a waiting tool call: it is dead-lettered as approval_denied and its goal fails. Audited."""
    return await logic.decide_approval(deps, tenant, approval_id, False, body.reason)


def _answered(result: RequestAccepted | StateChanged | RequestRejected) -> Any:
    """202 while the request stands unanswered, 200 once its change took effect, 409 when refused."""
    if isinstance(result, StateChanged):
        return JSONResponse(result.model_dump(mode="json"), status_code=200)
    if isinstance(result, RequestRejected):
        return JSONResponse(result.model_dump(mode="json"), status_code=409)
    return result


async def _frames(
    deps: logic.GatewayDeps, key: str, resume: stream.Resume, give_back: Callable[[], None],
) -> AsyncIterator[ServerSentEvent]:
    """The SSE body: new events of the goal, until its last one. It holds a stream slot while it
    runs, given back however it ends (the goal ended, the client left, the server stops)."""
    try:
        async for batch in stream.follow(deps.streams, key, resume.cursor, deps.settings.stream_block_ms):
            for frame in stream.frames(batch, resume.seen):
                yield ServerSentEvent(data=frame.data_json, event=frame.event, id=frame.id)
                deps.metrics.gateway_events.inc()
                if frame.ends:
                    return
    finally:
        give_back()


@dataclass
class GatewayServer:
    """`switchboard serve gateway`: uvicorn with the app, and the process's Prometheus endpoint."""

    server: uvicorn.Server
    metrics: MetricsEndpoint | None

    def run(self) -> int:
        """Serve until interrupted; 0 after a clean stop, 1 when the app could not start (Kafka or
        Redis unreachable: uvicorn has logged why)."""
        try:
            self.server.run()
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return 0 if self.server.started else 1


def prepare(settings: Settings) -> GatewayServer:
    """The server `switchboard serve gateway` runs. Raises ConfigurationError (nothing started)
    for settings it could not serve with, e.g. no GATEWAY_API_KEYS."""
    gateway = GatewaySettings.from_env()
    metrics = Metrics()
    app = create_app(settings, gateway, metrics)
    if settings.platform.signing_key is None:
        log.warning(
            "SWITCHBOARD_SIGNING_KEY is not set: the gateway signs what it publishes with the development key, "
            "which anyone can read in the source. Set the same secret key on every service of a deployment."
        )
    # log_config=None: the platform's logging (set up by the CLI) stays in charge of uvicorn's loggers.
    config = uvicorn.Config(app, host=gateway.host, port=gateway.port, lifespan="on", log_config=None)
    endpoint = serve_metrics(metrics, settings.platform.metrics_host, settings.platform.metrics_port)
    return GatewayServer(uvicorn.Server(config), endpoint)
