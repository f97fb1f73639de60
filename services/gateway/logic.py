"""What the HTTP gateway decides and does for each request: whose key it is, which event to
publish, and what a goal's state, answer and approvals are, read from Redis. No HTTP here.

The gateway never calls a model: it publishes events (signed, like every service's) and reads
the state the orchestrator stores, the budget ledger and each goal's episodic record.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, SecretStr
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.timeline import TimelineEntry
from schemas.budget import BudgetLimits
from schemas.envelope import Envelope, new_id
from schemas.events import (
    ApprovalDecided,
    GoalAnswered,
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalLifecycleRequested,
    GoalStateName,
    GoalSubmitted,
    LifecycleAction,
    LifecycleRequest,
)
from schemas.topics import Topics
from services.gateway import stream
from services.gateway.models import (
    ApprovalSent,
    Escalation,
    GoalAccepted,
    GoalFailure,
    GoalRequest,
    GoalStatus,
    PendingApproval,
    RequestAccepted,
    RequestRejected,
    StateChanged,
    TaskStatus,
)
from services.gateway.settings import GatewaySettings
from services.runtime.approvals import ApprovalBook
from services.runtime.budget import BudgetLedger, BudgetStatus
from services.runtime.bus import Producer
from services.runtime.errors import ConfigurationError, SwitchboardError
from services.runtime.goal_types import GoalTypes
from services.runtime.goal_view import GoalStateView
from services.runtime.metrics import Metrics
from services.runtime.signing import Signer, event_headers
from services.runtime.tracecontext import child_traceparent, new_traceparent

SUBMITTED_BY = "gateway"
"""`GoalSubmitted.submitted_by` of the goals the gateway accepts."""


class NotFound(SwitchboardError, LookupError):
    """No such goal or approval for this tenant (another tenant's is not found either)."""


class Unauthorized(SwitchboardError, PermissionError):
    """No API key, or one that is not configured."""


class UnknownGoalType(SwitchboardError, ValueError):
    """The goal names a type that is not configured: the orchestrator would fail it at once."""


class OverCeiling(SwitchboardError, PermissionError):
    """The goal asks for a budget above its tenant's ceiling: the orchestrator would fail it at once."""


class Busy(SwitchboardError):
    """This replica serves as many event streams as it may; the client should try again later."""


@dataclass
class StreamSlots:
    """Event streams (and waits) this replica has open: each holds a Redis connection in XREAD."""

    limit: int
    open: int = 0
    metrics: Metrics | None = None
    """Where the number open is shown (switchboard_gateway_streams)."""

    def take(self) -> Callable[[], None]:
        """Take a slot, or raise Busy when every one is taken. Returns what gives it back: call it
        as often as you like (every path a stream can end by does); the slot is given back once."""
        if self.open >= self.limit:
            raise Busy(f"this gateway replica already serves {self.limit} event streams; try again shortly")
        self.open += 1
        self._show()
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.open -= 1
                self._show()

        return give_back

    def _show(self) -> None:
        if self.metrics is not None:
            self.metrics.gateway_streams.set(self.open)


@dataclass(frozen=True)
class GatewayDeps:
    redis: Redis
    """For requests: short commands."""
    streams: Redis
    """For blocking XREADs, on a pool of its own, so that waiting streams never starve requests."""
    producer: Producer
    keys: RedisKeys
    topics: Topics
    signer: Signer
    ledger: BudgetLedger
    settings: GatewaySettings
    slots: StreamSlots
    goal_types: GoalTypes = field(default_factory=lambda: GoalTypes({}))
    metrics: Metrics = field(default_factory=Metrics)
    """The process's metrics: requests, open streams, events streamed."""


# ---- who is asking ----------------------------------------------------------------------------


class ApiKeys:
    """The configured API keys (GATEWAY_API_KEYS), held as digests worked out once."""

    def __init__(self, keys: Mapping[SecretStr, str]) -> None:
        self._digests = [(hashlib.sha256(k.get_secret_value().encode()).digest(), t) for k, t in keys.items()]

    def tenant_for(self, presented: str | None) -> str | None:
        """The tenant of the API key presented, or None. Every configured key is compared, each in
        constant time over equal-length digests, so the time taken says nothing about the keys."""
        if not presented:
            return None
        given = hashlib.sha256(presented.encode()).digest()
        tenant = None
        for digest, owner in self._digests:
            if hmac.compare_digest(digest, given) and tenant is None:
                tenant = owner
        return tenant


def actor(tenant: str) -> str:
    """Who a request is announced as (requested_by, answered_by, decided_by): the key's tenant."""
    return f"{tenant}@gateway"


def events_url(goal_id: str) -> str:
    return f"/goals/{goal_id}/events"


# ---- publishing -------------------------------------------------------------------------------


async def publish(deps: GatewayDeps, topic: str, key: str, event: Envelope, parent: str | None = None) -> None:
    value = event.to_bytes()
    trace = child_traceparent(parent) if parent else new_traceparent()
    await deps.producer.send(topic, key.encode(), value, event_headers(event, value, deps.signer, trace))


# ---- goals ------------------------------------------------------------------------------------


class Submission(BaseModel):
    """What the gateway remembers of a goal it accepted (RedisKeys.gateway_goal)."""

    model_config = ConfigDict(extra="ignore")
    event_id: str
    text: str
    goal_type: str | None = None


def check_goal(deps: GatewayDeps, tenant: str, request: GoalRequest) -> None:
    """Raises for a goal the orchestrator would fail at once, with its message. Nothing is published."""
    if request.goal_type is not None:
        try:
            deps.goal_types.get(request.goal_type)
        except ConfigurationError as exc:
            raise UnknownGoalType(str(exc)) from exc
    try:
        deps.ledger.limits_for(tenant, request.budget or BudgetLimits())
    except ValueError as exc:
        raise OverCeiling(str(exc)) from exc


def goal_id_for(tenant: str, idempotency_key: str | None) -> str:
    """A new goal's id; with an Idempotency-Key, always the same one for the tenant's key, so a
    client that retries a submission whose answer it never got does not start a second goal."""
    if idempotency_key is None:
        return f"g-{new_id()[:12]}"
    return "g-" + hashlib.sha256(f"{tenant}\n{idempotency_key}".encode()).hexdigest()[:24]


async def submit_goal(
    deps: GatewayDeps, tenant: str, request: GoalRequest, idempotency_key: str | None = None,
) -> tuple[GoalAccepted, bool]:
    """Publish the goal, and whether it is new. It is remembered first, so that a status read
    right after this returns finds it; if it cannot be published, it is forgotten again. A
    submission with an Idempotency-Key already accepted is not published again. (One whose
    publish timed out but arrived may be published twice, with the same goal id: the orchestrator
    plans a goal id once.)"""
    check_goal(deps, tenant, request)
    goal_id = goal_id_for(tenant, idempotency_key)
    event = GoalSubmitted(
        tenant=tenant, goal_id=goal_id, text=request.text, budget=request.budget or BudgetLimits(),
        goal_type=request.goal_type, submitted_by=SUBMITTED_BY,
    )
    key = deps.keys.gateway_goal(tenant, event.goal_id)
    record = Submission(event_id=event.event_id, text=event.text, goal_type=event.goal_type)
    accepted = GoalAccepted(goal_id=event.goal_id, events=events_url(event.goal_id))
    if not await deps.redis.set(key, record.model_dump_json(), ex=deps.settings.submission_ttl_s, nx=True):
        return accepted, False  # this Idempotency-Key's goal was accepted before
    try:
        await publish(deps, deps.topics.goals, event.goal_id, event)
    except Exception:
        await deps.redis.delete(key)
        raise
    return accepted, True


async def goal_known(deps: GatewayDeps, tenant: str, goal_id: str) -> bool:
    """The orchestrator has the goal's state, the gateway accepted it, or it has a record."""
    keys = deps.keys
    found = await deps.redis.exists(
        keys.goal_state(tenant, goal_id), keys.gateway_goal(tenant, goal_id), keys.goal_stream(tenant, goal_id)
    )
    return bool(found)


async def require_goal(deps: GatewayDeps, tenant: str, goal_id: str) -> None:
    if not await goal_known(deps, tenant, goal_id):
        raise NotFound(f"no goal {goal_id!r} for this API key's tenant")


async def goal_status(deps: GatewayDeps, tenant: str, goal_id: str) -> GoalStatus:
    keys = deps.keys
    raw_state, raw_submission = await deps.redis.mget(keys.goal_state(tenant, goal_id), keys.gateway_goal(tenant, goal_id))
    stored = GoalStateView.model_validate_json(raw_state) if raw_state else None
    submission = Submission.model_validate_json(raw_submission) if raw_submission else None
    outcome = None
    if stored is None or stored.status in ("completed", "failed", "waiting_for_human"):
        wanted = stream.OUTCOMES | {"goal.escalated"}
        outcome = await stream.newest_first(deps.redis, keys.goal_stream(tenant, goal_id), lambda e: e.event_type in wanted)
    if stored is None and submission is None and outcome is None:
        raise NotFound(f"no goal {goal_id!r} for this API key's tenant")
    budget = await deps.ledger.status(tenant, goal_id)
    return status_view(tenant, goal_id, stored, submission, outcome, budget)


def status_view(
    tenant: str, goal_id: str, stored: GoalStateView | None, submission: Submission | None,
    outcome: TimelineEntry | None, budget: BudgetStatus | None,
) -> GoalStatus:
    """The goal as GET /goals/{id} shows it. The orchestrator's state wins; before it has stored
    one the goal is `submitted`; once it has forgotten it, the record's outcome still tells."""
    ended = _outcome(outcome)
    if stored is not None:
        state: GoalStateName = stored.status
    elif isinstance(ended, GoalCompleted):
        state = "completed"
    elif isinstance(ended, GoalFailed):
        state = "failed"
    else:
        state = "submitted"
    goal = stored.goal if stored is not None else submission
    view = GoalStatus(
        goal_id=goal_id, tenant=tenant, state=state,
        text=goal.text if goal is not None else None,
        goal_type=goal.goal_type if goal is not None else None,
        tasks=[
            TaskStatus(id=pid, task_id=t.task_id, kind=t.planned.kind, status=t.status)
            for pid, t in (stored.tasks.items() if stored else [])
        ],
        spent=budget.spent if budget else {},
        limits=budget.limits if budget else None,
        in_flight=budget.in_flight if budget else 0,
        events=events_url(goal_id),
    )
    if isinstance(ended, GoalCompleted) and state == "completed":
        view.answer, view.path, view.fallback, view.answered_by = ended.answer, ended.path, ended.fallback, ended.answered_by
    elif isinstance(ended, GoalFailed) and state == "failed":
        view.failure = GoalFailure(reason=ended.reason, detail=ended.detail)
    elif isinstance(ended, GoalEscalated) and state == "waiting_for_human":
        view.escalation = Escalation(
            reason=ended.reason, detail=ended.detail, task_results=ended.task_results,
            answer_with=f"/goals/{goal_id}/answer",
        )
    return view


def _outcome(entry: TimelineEntry | None) -> GoalCompleted | GoalFailed | GoalEscalated | None:
    if entry is None:
        return None
    models: dict[str, type[GoalCompleted | GoalFailed | GoalEscalated]] = {
        "goal.completed": GoalCompleted, "goal.failed": GoalFailed, "goal.escalated": GoalEscalated,
    }
    model = models[entry.event_type]
    # The record holds what the services produced; fields a newer schema added are not ours to judge.
    data = {k: v for k, v in json.loads(entry.payload).items() if k in model.model_fields}
    return model.model_validate(data)


# ---- lifecycle --------------------------------------------------------------------------------


async def change_goal(
    deps: GatewayDeps, tenant: str, goal_id: str, action: LifecycleRequest, reason: str, wait: bool,
) -> RequestAccepted | StateChanged | RequestRejected:
    await require_goal(deps, tenant, goal_id)
    request = GoalLifecycleRequested(
        tenant=tenant, goal_id=goal_id, action=action, requested_by=actor(tenant), reason=reason
    )
    return await _ask(deps, request, action, wait)


async def answer_goal(
    deps: GatewayDeps, tenant: str, goal_id: str, answer: str, wait: bool,
) -> RequestAccepted | StateChanged | RequestRejected:
    await require_goal(deps, tenant, goal_id)
    answered = GoalAnswered(tenant=tenant, goal_id=goal_id, answer=answer, answered_by=actor(tenant))
    return await _ask(deps, answered, "answer", wait)


async def _ask(
    deps: GatewayDeps, request: Envelope, action: LifecycleAction, wait: bool,
) -> RequestAccepted | StateChanged | RequestRejected:
    """Publish a request to the orchestrator; with `wait`, return its answer (GoalStateChanged or
    GoalLifecycleRejected, caused by the request) as the goal's record holds it, if it comes in time."""
    accepted = RequestAccepted(request_id=request.event_id, goal_id=request.goal_id, action=action)
    if not wait:
        await publish(deps, deps.topics.goals, request.goal_id, request)
        return accepted
    key = deps.keys.goal_stream(request.tenant, request.goal_id)
    give_back = deps.slots.take()
    try:
        cursor = await stream.last_entry_id(deps.redis, key)  # before publishing: the answer comes after it
        await publish(deps, deps.topics.goals, request.goal_id, request)
        timeout = deps.settings.wait_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for batch in stream.follow(deps.streams, key, cursor, deps.settings.stream_block_ms):
                    for entry in batch:
                        answer = answer_to(request.event_id, entry)
                        if answer is not None:
                            return answer
        except TimeoutError:
            pass
    finally:
        give_back()
    accepted.detail = f"no answer from the orchestrator within {timeout:g}s; the request stands"
    return accepted


def answer_to(request_id: str, entry: TimelineEntry) -> StateChanged | RequestRejected | None:
    """The orchestrator's answer to the request, if this record entry is it."""
    if entry.event_type not in ("goal.state_changed", "goal.lifecycle_rejected"):
        return None
    data = cast(dict[str, Any], json.loads(entry.payload))
    if data.get("causation_id") != request_id:
        return None
    if entry.event_type == "goal.state_changed":
        return StateChanged(
            request_id=request_id, goal_id=data["goal_id"], action=data["action"],
            from_state=data["from_state"], to_state=data["to_state"],
        )
    return RequestRejected(detail=data["detail"], request_id=request_id, state=data.get("state"))


# ---- approvals --------------------------------------------------------------------------------


async def pending_approvals(deps: GatewayDeps, tenant: str) -> list[PendingApproval]:
    """The tenant's tool calls waiting for a decision, soonest to expire first."""
    return [
        PendingApproval(
            approval_id=a.approval_id, goal_id=a.request.goal_id, task_id=a.request.task_id, tool=a.request.tool,
            arguments=a.request.arguments, agent_kind=a.request.agent_kind, expires_at=a.expires.isoformat(),
        )
        for a in await ApprovalBook(deps.redis, deps.keys).pending(tenant)
    ]


async def decide_approval(deps: GatewayDeps, tenant: str, approval_id: str, approved: bool, reason: str) -> ApprovalSent:
    """Send the decision as `switchboard approve|deny` does: signed (the executor refuses unsigned
    decisions), on the tools topic, in the tool request's trace."""
    approval = await ApprovalBook(deps.redis, deps.keys).get(tenant, approval_id)
    if approval is None or approval.state != "pending":
        raise NotFound(f"no tool call of this API key's tenant is waiting for approval {approval_id!r}")
    r = approval.request
    decision = ApprovalDecided(
        **r.caused(), approval_id=approval_id, approved=approved, decided_by=actor(tenant), reason=reason
    )
    await publish(deps, deps.topics.tools, r.task_id or r.goal_id, decision, parent=approval.traceparent)
    return ApprovalSent(
        approval_id=approval_id, decision="approved" if approved else "denied", request_id=decision.event_id
    )
