"""Memory decisions: what to recall for a task, what a knowledge-base search returns, what to keep."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from memory.semantic import MemoryRecord, SemanticMemory
from memory.timeline import GoalTimeline
from schemas.envelope import Envelope
from schemas.events import (
    MemoryHit,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskCompleted,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.tools import KnowledgeSearchArgs
from services.runtime.audit import TOOL_DENIED, TOOL_EXECUTED, tool_audit
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import Permanent, ToolDenied


@dataclass(frozen=True)
class MemoryDeps:
    semantic: SemanticMemory
    timeline: GoalTimeline
    min_score: float
    audit_topic: str
    """Where each kb_search execution is recorded (AuditRecorded, keyed by goal)."""
    catalogue: AgentCatalogue | None = None
    """The agent kinds, to check again that the requesting kind may call kb_search."""


async def recall(deps: MemoryDeps, request: MemoryRecallRequested) -> list[Outgoing]:
    found = await deps.semantic.recall(
        request.tenant, request.query, request.k, kinds=("fact", "outcome"), min_score=deps.min_score
    )
    hits = [MemoryHit(memory_id=r.memory_id, kind=r.kind, text=r.text, score=round(r.score, 4), source_goal=r.source_goal) for r in found]
    reply = MemoryRecallCompleted(**request.caused(), request_id=request.request_id, hits=hits)
    return [Outgoing(request.reply_to, reply, request.task_id or request.goal_id)]


async def search_knowledge(deps: MemoryDeps, request: ToolCallRequested) -> list[Outgoing]:
    """The kb_search tool, executed here because this service owns semantic memory. Audited."""
    try:
        args = _admit(deps, request)
    except Permanent as exc:
        policy = exc.policy if isinstance(exc, ToolDenied) else "arguments"
        exc.outputs.append(_audit(deps, request, TOOL_DENIED, policy=policy, reason=exc.reason, error=str(exc)[:1_000]))
        raise
    found = await deps.semantic.recall(request.tenant, args.query, args.k, kinds=("fact",), min_score=deps.min_score)
    output = "\n".join(r.text for r in found) if found else "no matching facts"
    executed = _audit(deps, request, TOOL_EXECUTED, ok=True, replayed=False)
    return [_tool_reply(request, ok=True, output=output, error=None), executed]


def _admit(deps: MemoryDeps, request: ToolCallRequested) -> KnowledgeSearchArgs:
    """The same checks as the tools executor: a refusal is final, so it is dead-lettered."""
    if request.tool != "kb_search":
        raise ToolDenied(f"{request.tool!r} does not run on the memory service", policy="executor_tools")
    kind = deps.catalogue.kinds.get(request.agent_kind) if deps.catalogue is not None else None
    if deps.catalogue is not None and (kind is None or "kb_search" not in kind.tools):
        # The agent checked this already; checked again in case the request was forged.
        raise ToolDenied(f"kb_search is not allowed for agent kind {request.agent_kind!r}", policy="agent_allowlist")
    try:
        return KnowledgeSearchArgs.model_validate(request.arguments)
    except ValidationError as exc:
        raise Permanent(f"invalid arguments for kb_search: {exc}", reason="schema_invalid") from exc


def _audit(deps: MemoryDeps, request: ToolCallRequested, action: str, **detail: object) -> Outgoing:
    return Outgoing(deps.audit_topic, tool_audit(request, action, **detail), request.goal_id)


def _tool_reply(request: ToolCallRequested, *, ok: bool, output: str, error: str | None) -> Outgoing:
    event = ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool=request.tool,
        ok=ok, output=output, error=error,
    )
    return Outgoing(request.reply_to, event, request.task_id or request.goal_id)


async def record(deps: MemoryDeps, event: Envelope) -> list[Outgoing]:
    """Append every goal event to the goal's stream; keep completed task outcomes in semantic memory."""
    await deps.timeline.append(event.tenant, event.goal_id, event.event_type, event.event_id, event.to_bytes())
    if isinstance(event, TaskCompleted) and event.result.strip():
        await deps.semantic.remember(
            [
                MemoryRecord(
                    tenant=event.tenant, kind="outcome", text=event.result, source=f"task/{event.task_id}",
                    agent=event.kind, source_goal=event.goal_id,
                )
            ]
        )
    return []


def seed_records(path: Path, tenants: tuple[str, ...]) -> list[MemoryRecord]:
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            records += [MemoryRecord(tenant=t, kind="fact", text=item["text"], source=f"seed/{item['id']}") for t in tenants]
    return records
