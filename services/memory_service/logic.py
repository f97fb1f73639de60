"""Memory decisions: what to recall for a task, what the memory tools do, what to keep.

What is kept (curated by memory.semantic): a completed task's result as an outcome, unless it
only repeats memories the task was served; a failed or dead-lettered task as a lesson labelled
with its cause; facts that agents store with `remember_fact`, versioned by subject. In a replay,
the goal's record answers recalls and memory tool calls instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.semantic import MemoryRecord, Recalled, SemanticMemory
from memory.timeline import GoalTimeline
from schemas.envelope import Envelope
from schemas.events import (
    MemoryHit,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
    WorkDeadLettered,
)
from schemas.tools import TOOL_SPECS, KnowledgeSearchArgs, RememberFactArgs, ToolArgs
from services.runtime.audit import TOOL_DENIED, TOOL_EXECUTED, tool_audit
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentCatalogue
from services.runtime.goal_types import GoalTypes, may_call
from services.runtime.errors import Permanent, Retryable, ToolDenied
from services.runtime.host import Replay
from services.runtime.metrics import Metrics, ToolErrorKind
from services.runtime.tracing import Tracing


A = TypeVar("A", bound=ToolArgs)


@dataclass(frozen=True)
class MemoryDeps:
    semantic: SemanticMemory
    timeline: GoalTimeline
    redis: Redis
    keys: RedisKeys
    audit_topic: str
    """Where each memory tool execution is recorded (AuditRecorded, keyed by goal)."""
    catalogue: AgentCatalogue | None = None
    """The agent kinds, to check again that the requesting kind may call the tool."""
    goal_types: GoalTypes = field(default_factory=lambda: GoalTypes({}))
    """Goal types whose fallbacks call memory tools, each as the actor `fallback:<type>`."""
    task_ttl_s: int = 7 * 86_400
    """How long a task's instruction and served memories are kept for curating its outcome."""
    replay: Replay | None = None
    """Set when a recorded goal runs again (`switchboard replay`): the record answers the recalls
    and memory tool calls it holds."""
    metrics: Metrics = field(default_factory=Metrics)
    """Each memory tool run counts in the tool latency and error metrics, like a tool's."""
    tracing: Tracing = field(default_factory=Tracing.local)
    """Each memory tool run is an `execute_tool {tool}` span, like a tool's."""


async def recall(deps: MemoryDeps, request: MemoryRecallRequested) -> list[Outgoing]:
    """A task's memories: facts, outcomes and failure lessons (labelled), current versions only."""
    recorded = deps.replay.recall(request) if deps.replay is not None else None
    if recorded is not None:
        return [Outgoing(request.reply_to, recorded, request.task_id or request.goal_id)]
    found = await deps.semantic.recall(
        request.tenant, request.query, request.k, kinds=("fact", "outcome", "lesson")
    )
    await _note_served(deps, request, found)
    hits = [
        MemoryHit(
            memory_id=r.memory_id, kind=r.kind, text=r.text, score=round(r.score, 4), source_goal=r.source_goal,
            label=r.label, version=r.version,
        )
        for r in found
    ]
    reply = MemoryRecallCompleted(**request.caused(), request_id=request.request_id, hits=hits)
    return [Outgoing(request.reply_to, reply, request.task_id or request.goal_id)]


async def execute_tool(deps: MemoryDeps, request: ToolCallRequested) -> list[Outgoing]:
    """The memory tools (kb_search, remember_fact), run here because this service owns semantic
    memory. Checked like at the tools executor, and audited."""
    spec = TOOL_SPECS.get(request.tool)
    if deps.replay is not None and spec is not None and spec.executor == "memory":
        args = _admitted(deps, request, spec.name, spec.args)
        recorded = deps.replay.tool_result(request, args.model_dump(mode="json"), spec.side_effect)
        if recorded is not None:
            return [Outgoing(request.reply_to, recorded, request.task_id or request.goal_id)]
    run = remember_fact if request.tool == "remember_fact" else search_knowledge
    with deps.tracing.tool(request.tool, request.call_id, request.arguments):
        return await run(deps, request)


async def search_knowledge(deps: MemoryDeps, request: ToolCallRequested) -> list[Outgoing]:
    args = _admitted(deps, request, "kb_search", KnowledgeSearchArgs)
    found = await _timed(
        deps, "kb_search",
        deps.semantic.recall(request.tenant, args.query, args.k, kinds=("fact",)),
    )
    await _note_served(deps, request, found)
    output = "\n".join(r.text for r in found) if found else "no matching facts"
    executed = _audit(deps, request, TOOL_EXECUTED, ok=True, replayed=False)
    return [_tool_reply(request, ok=True, output=output, error=None), executed]


async def remember_fact(deps: MemoryDeps, request: ToolCallRequested) -> list[Outgoing]:
    """Store a fact, versioned by its subject; the tool call's id is its source, so a redelivered
    request changes nothing. valid_from is when the request was made."""
    args = _admitted(deps, request, "remember_fact", RememberFactArgs)
    fact = MemoryRecord(
        tenant=request.tenant, kind="fact", text=args.fact, source=f"call/{request.call_id}",
        agent=request.agent_kind, source_goal=request.goal_id, quality=0.8, subject=args.subject,
        valid_from=request.ts.timestamp(),
    )
    written = await _timed(
        deps, "remember_fact", deps.semantic.write(fact, served=await _served(deps, request.tenant, request.task_id))
    )
    output = {
        "added": "stored as a new fact",
        "merged": "already known; the existing fact was confirmed",
        "superseded": "stored; it replaces the previous version of this subject",
        "outdated": "kept as history: a newer version of this subject is already stored",
        "echo": "not stored: it repeats a memory this task was given",
    }[written.action]
    executed = _audit(deps, request, TOOL_EXECUTED, ok=True, replayed=False, memory=written.action)
    return [_tool_reply(request, ok=True, output=f"{output} (memory {written.memory_id})", error=None), executed]


R = TypeVar("R")


async def _timed(deps: MemoryDeps, tool: str, work: Awaitable[R]) -> R:
    """The tool's own work (after admission), in the tool latency and error metrics."""
    started = time.perf_counter()
    kind: ToolErrorKind | None = None
    try:
        return await work
    except Retryable:
        kind = "transient"
        raise
    except Exception:
        kind = "failed"
        raise
    finally:
        deps.metrics.tool_call(tool, time.perf_counter() - started, kind)


def _admitted(deps: MemoryDeps, request: ToolCallRequested, tool: str, model: type[A]) -> A:
    """The same checks as the tools executor: a refusal is final, so it is dead-lettered, and
    audited."""
    try:
        return _admit(deps, request, tool, model)
    except Permanent as exc:
        policy = exc.policy if isinstance(exc, ToolDenied) else "arguments"
        exc.outputs.append(_audit(deps, request, TOOL_DENIED, policy=policy, reason=exc.reason, error=str(exc)[:1_000]))
        raise


def _admit(deps: MemoryDeps, request: ToolCallRequested, tool: str, model: type[A]) -> A:
    if request.tool != tool:
        raise ToolDenied(f"{request.tool!r} does not run on the memory service", policy="executor_tools")
    if deps.catalogue is not None and not may_call(deps.catalogue, deps.goal_types, request.agent_kind, tool):
        # The agent checked this already; checked again in case the request was forged.
        raise ToolDenied(f"{tool} is not allowed for agent kind {request.agent_kind!r}", policy="agent_allowlist")
    try:
        return model.model_validate(request.arguments)
    except ValidationError as exc:
        raise Permanent(f"invalid arguments for {tool}: {exc}", reason="schema_invalid") from exc


async def _note_served(deps: MemoryDeps, request: Envelope, found: list[Recalled]) -> None:
    if request.task_id and found:
        key = deps.keys.served_memories(request.tenant, request.task_id)
        async with deps.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, *(r.memory_id for r in found))
            pipe.expire(key, deps.task_ttl_s)
            await pipe.execute()


async def _served(deps: MemoryDeps, tenant: str, task_id: str | None) -> frozenset[str]:
    if not task_id:
        return frozenset()
    members = await deps.redis.smembers(deps.keys.served_memories(tenant, task_id))
    return frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in members)


def _audit(deps: MemoryDeps, request: ToolCallRequested, action: str, **detail: object) -> Outgoing:
    return Outgoing(deps.audit_topic, tool_audit(request, action, **detail), request.goal_id)


def _tool_reply(request: ToolCallRequested, *, ok: bool, output: str, error: str | None) -> Outgoing:
    event = ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool=request.tool,
        ok=ok, output=output, error=error,
    )
    return Outgoing(request.reply_to, event, request.task_id or request.goal_id)


async def record(deps: MemoryDeps, event: Envelope) -> list[Outgoing]:
    """Append every goal event to the goal's stream, then keep what is worth keeping."""
    await deps.timeline.append(event.tenant, event.goal_id, event.event_type, event.event_id, event.to_bytes())
    await curate(deps, event)
    return []


async def curate(deps: MemoryDeps, event: Envelope) -> None:
    """Outcomes of completed tasks, lessons of failed ones; the instruction of each task as it is
    assigned, so both can say what was asked."""
    if isinstance(event, TaskAssigned) and event.task_id:
        await deps.redis.set(deps.keys.task_brief(event.tenant, event.task_id), event.instruction, ex=deps.task_ttl_s)
    elif isinstance(event, TaskCompleted) and event.result.strip() and event.task_id:
        await deps.semantic.write(
            MemoryRecord(
                tenant=event.tenant, kind="outcome", text=event.result, source=f"task/{event.task_id}",
                agent=event.kind, source_goal=event.goal_id, quality=0.6, valid_from=event.ts.timestamp(),
            ),
            served=await _served(deps, event.tenant, event.task_id),
        )
    elif isinstance(event, TaskFailed | WorkDeadLettered) and event.task_id:
        # One lesson per task: a failure that is also dead-lettered has the same source.
        asked = event.instruction if isinstance(event, TaskFailed) else None
        if not asked:  # a dead letter names no instruction: the one kept when the task was assigned
            brief = await deps.redis.get(deps.keys.task_brief(event.tenant, event.task_id))
            asked = brief.decode() if isinstance(brief, bytes) else (brief or f"task {event.task_id}")
        detail = f": {event.detail[:300]}" if event.detail else ""
        await deps.semantic.write(
            MemoryRecord(
                tenant=event.tenant, kind="lesson", text=f"FAILED: {asked} — {event.reason}{detail}",
                source=f"lesson/{event.task_id}", agent=getattr(event, "kind", None), source_goal=event.goal_id,
                quality=0.8, valid_from=event.ts.timestamp(), cause=event.reason,
            )
        )


def seed_records(path: Path, tenants: tuple[str, ...]) -> list[MemoryRecord]:
    """Seed facts: each line's id is its subject, so editing a line's text makes a new version."""
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            records += [
                MemoryRecord(
                    tenant=t, kind="fact", text=item["text"], source=f"seed/{item['id']}/{_digest(item['text'])}",
                    quality=1.0, subject=f"seed {item['id']}",
                )
                for t in tenants
            ]
    return records


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
