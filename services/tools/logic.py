"""Tool execution decisions: re-check the allowlist, validate arguments, run once within the
tool's limits, and answer the agent, or raise what the platform should do with the request.
Every execution and every refusal is audited; configured secrets are redacted from the answer.
Each run is an `execute_tool {tool}` span. In a replay, the goal's record answers instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from pydantic import ValidationError

from schemas.events import (
    MAX_TEXT,
    ApprovalDecided,
    ApprovalRequested,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.tools import TOOL_SPECS, ToolArgs, ToolSpec
from services.runtime.approvals import Approval, ApprovalBook
from services.runtime.audit import TOOL_DENIED, TOOL_EXECUTED, tool_audit
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import Permanent, ToolDenied
from services.runtime.goal_types import GoalTypes, may_call
from services.runtime.host import Replay
from services.runtime.idempotency import SideEffectGuard, idempotency_digest
from services.runtime.tracing import Tracing, failed
from services.tools.limits import ToolLimiter
from services.tools.redaction import Redactor
from services.tools.registry import CallContext, Tool, ToolUsageError


@dataclass(frozen=True)
class ToolsDeps:
    tools: dict[str, Tool]
    limiters: dict[str, ToolLimiter]
    """One per tool in `tools`: its timeout, concurrency cap and circuit breaker in this replica."""
    catalogue: AgentCatalogue
    guard: SideEffectGuard
    audit_topic: str
    """Where every execution and refusal is recorded (AuditRecorded, keyed by goal)."""
    redact: Redactor = field(default_factory=Redactor)
    """Removes the executor's configured secrets from what it answers."""
    approvals: ApprovalBook | None = None
    needs_approval: frozenset[str] = frozenset()
    """Tools that run only once a person has approved the call (TOOLS_NEEDS_APPROVAL)."""
    approval_timeout_s: float = 3_600.0
    approvals_topic: str = ""
    tracing: Tracing = field(default_factory=Tracing.local)
    goal_types: GoalTypes = field(default_factory=lambda: GoalTypes({}))
    """Goal types whose fallbacks call tools here, each as the actor `fallback:<type>`."""
    replay: Replay | None = None
    """Set when a recorded goal runs again (`switchboard replay`): the record answers the calls it
    holds; a call with a side effect is never run again."""


TRUNCATED = "\n[truncated]"
APPROVAL_REQUESTED = "approval.requested"
APPROVAL_APPROVED = "approval.approved"
APPROVAL_DENIED = "approval.denied"


async def execute(deps: ToolsDeps, request: ToolCallRequested, traceparent: str | None = None) -> list[Outgoing]:
    """The reply to the agent. Raises ToolDenied or Permanent (dead-lettered with their reason)
    and Retryable (the request waits in a retry topic, e.g. while the tool's circuit is open).
    A refusal or a crash carries its audit record in `outputs`, produced with the dead letter."""
    try:
        spec, tool, args = _admit(deps, request)
    except Permanent as exc:
        policy = exc.policy if isinstance(exc, ToolDenied) else "arguments"
        detail = {"policy": policy, "reason": exc.reason, "error": deps.redact(str(exc))[:1_000]}
        exc.outputs.append(_audit(deps, request, TOOL_DENIED, **detail))
        exc.args = (deps.redact(str(exc)),)  # the message becomes the dead letter's x-dlq-exception-message
        raise
    canonical = args.model_dump(mode="json")
    recorded = deps.replay.tool_result(request, canonical, spec.side_effect) if deps.replay is not None else None
    if recorded is not None:
        return [Outgoing(request.reply_to, recorded, request.task_id or request.goal_id)]
    digest = idempotency_digest(request.goal_id, request.task_id, request.step_id, request.tool, canonical)
    if request.tool in deps.needs_approval:
        waiting = await _await_approval(deps, request, digest[:24], traceparent)
        if waiting is not None:
            return waiting
    ctx = CallContext(request.tenant, request.goal_id, request.task_id or "", digest)
    with deps.tracing.tool(request.tool, request.call_id, canonical, scrub=deps.redact) as span:
        try:
            # Breaker and slot come before the side-effect claim, so the claim is held only while
            # the tool runs (bounded by its timeout), never while the call waits for a slot.
            async with deps.limiters[request.tool].attempt() as attempt:
                run = partial(attempt.run, partial(tool.run, args, ctx))
                if spec.side_effect:
                    output, replayed = await deps.guard.run_once(request.tenant, digest, run)
                else:
                    output, replayed = await run(), False
        except ToolUsageError as exc:
            error = deps.redact(str(exc))
            failed(span, exc, kind="usage", scrub=deps.redact)
            return [_reply(request, ok=False, error=error), _executed(deps, request, spec, digest, ok=False, error=error)]
        except Permanent as exc:  # the tool crashed (a Retryable is audited once it runs, or is dead-lettered)
            error = deps.redact(str(exc))[:1_000]
            exc.outputs.append(_executed(deps, request, spec, digest, ok=False, error=error, reason=exc.reason))
            exc.args = (deps.redact(str(exc)),)
            raise
        deps.tracing.tool_result(span, deps.redact(output))
        span.set_attribute("switchboard.replayed", replayed)
    return [
        _reply(request, ok=True, output=deps.redact(output), replayed=replayed),
        _executed(deps, request, spec, digest, ok=True, replayed=replayed),
    ]


async def _await_approval(
    deps: ToolsDeps, request: ToolCallRequested, approval_id: str, traceparent: str | None
) -> list[Outgoing] | None:
    """None once the call is approved. Until then it waits in Redis, holding no consumer slot:
    the first request opens the approval and announces it; a denied one is dead-lettered."""
    assert deps.approvals is not None, "needs_approval without an approval book"
    approval = await deps.approvals.get(request.tenant, approval_id)
    if approval is None:
        opened = await deps.approvals.open(approval_id, request, deps.approval_timeout_s, traceparent)
        if opened is None:
            return []  # opened meanwhile by a redelivery of this request
        asked = ApprovalRequested(
            **request.caused(), approval_id=approval_id, call_id=request.call_id, tool=request.tool,
            arguments=request.arguments, agent_kind=request.agent_kind, expires_at=opened.expires,
        )
        expires = opened.expires.isoformat()
        return [
            Outgoing(deps.approvals_topic, asked, request.goal_id),
            _audit(deps, request, APPROVAL_REQUESTED, approval_id=approval_id, expires_at=expires),
        ]
    if approval.state == "pending":
        return []  # a redelivered request: the approval is already waiting
    if approval.state == "denied":
        raise _denied(deps, approval)
    return None


def _denied(deps: ToolsDeps, approval: Approval) -> Permanent:
    request = approval.request
    by = approval.decided_by or "unknown"
    exc = Permanent(
        f"{request.tool} call {request.call_id} was not approved (by {by}): {approval.reason or 'no reason given'}",
        reason="approval_denied",
    )
    exc.outputs.append(
        _audit(deps, request, APPROVAL_DENIED, actor=by, approval_id=approval.approval_id, reason=approval.reason)
    )
    return exc


async def decide(deps: ToolsDeps, decision: ApprovalDecided) -> list[Outgoing]:
    """Act on a person's (or the timeout's) decision: run the waiting call, or dead-letter it."""
    assert deps.approvals is not None, "an approval decision without an approval book"
    approval = await deps.approvals.decide(
        decision.tenant, decision.approval_id, decision.approved, decision.decided_by, decision.reason
    )
    if approval is None:
        raise ToolDenied(f"no approval {decision.approval_id!r} is waiting for tenant {decision.tenant!r}", policy="approval")
    if approval.state == "denied":
        raise _denied(deps, approval)
    decided = _audit(
        deps, approval.request, APPROVAL_APPROVED, actor=approval.decided_by, approval_id=approval.approval_id
    )
    return [decided, *await execute(deps, approval.request)]


def _executed(
    deps: ToolsDeps, request: ToolCallRequested, spec: ToolSpec, digest: str, *, ok: bool, replayed: bool = False,
    **detail: str,
) -> Outgoing:
    side_effect = {"idempotency_key": digest} if spec.side_effect else {}
    return _audit(deps, request, TOOL_EXECUTED, ok=ok, replayed=replayed, **side_effect, **detail)


def _audit(
    deps: ToolsDeps, request: ToolCallRequested, action: str, actor: str | None = None, **detail: object
) -> Outgoing:
    """The record of what happened to a request; the actor is the requesting agent kind, or the
    person who decided an approval."""
    record = tool_audit(request, action, **detail)
    if actor is not None:
        record = record.model_copy(update={"actor": actor})
    return Outgoing(deps.audit_topic, record, request.goal_id)


def _admit(deps: ToolsDeps, request: ToolCallRequested) -> tuple[ToolSpec, Tool, ToolArgs]:
    """The checks that need no tool call: a refusal here is final, so it is dead-lettered."""
    spec = TOOL_SPECS.get(request.tool)
    tool = deps.tools.get(request.tool)
    if spec is None or tool is None:
        raise ToolDenied(
            f"unknown tool {request.tool!r} on this executor; it runs {sorted(deps.tools)}", policy="executor_tools"
        )
    if not may_call(deps.catalogue, deps.goal_types, request.agent_kind, request.tool):
        # The agent checked this already; the executor checks again, in case the request was forged.
        raise ToolDenied(
            f"tool {request.tool!r} is not allowed for agent kind {request.agent_kind!r}", policy="agent_allowlist"
        )
    try:
        args = spec.args.model_validate(request.arguments)
    except ValidationError as exc:
        raise Permanent(f"invalid arguments for {request.tool}: {exc}", reason="schema_invalid") from exc
    tool.check(args)
    return spec, tool, args


def _reply(
    request: ToolCallRequested, *, ok: bool, output: str = "", error: str | None = None, replayed: bool = False
) -> Outgoing:
    if len(output) > MAX_TEXT:  # e.g. a page under TOOLS_HTTP_MAX_BYTES but over what an event holds
        output = output[: MAX_TEXT - len(TRUNCATED)] + TRUNCATED
    event = ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool=request.tool,
        ok=ok, output=output, error=error, replayed=replayed,
    )
    return Outgoing(request.reply_to, event, request.task_id or request.goal_id)
