"""One agent step per event: recall memory, call the model, validate its tool calls, or finish.

The reasoning loop's state is a TaskCheckpoint in Redis; nothing is kept in process memory, so
any replica can continue any task. Each model call's context is assembled afresh from the task,
its recalled memories and its scratchpad, within the agent's token budget (context.py). Before
each model call the gateway checks the goal's budget; before tool calls go out, the platform
checks for runaway loops and counts them against the budget. A stopped goal's task parks at its
next step and continues from there if it is reopened. A `delegate` call hands a subtask to another
agent kind, and its result comes back like a tool's (delegation.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from memory.keys import RedisKeys
from schemas.events import (
    AuditRecorded,
    MemoryHit,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
)
from schemas.tools import MAX_ARGUMENTS_BYTES, TOOL_SPECS, arguments_size
from schemas.topics import Topics
from services.agents import delegation
from services.agents.context import Shown, assemble, untrusted
from services.agents.delegation import DelegationPolicy
from services.agents.runaway import (
    RunawayLimits,
    call_signature,
    check_calls,
    result_digest,
    stale_after,
)
from services.runtime.audit import TOOL_DENIED
from services.runtime.budget import BudgetLedger
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentKind
from services.runtime.errors import GoalStopped, Permanent
from services.runtime.idempotency import Ledgered, StepLedger
from services.runtime.llm import LLMGateway, ModelToolCall
from services.runtime.prompts import PromptLibrary

log = logging.getLogger("switchboard.agent")


class PendingCall(BaseModel):
    call_id: str
    model_call_id: str
    tool: str
    result: str | None = None


class TaskCheckpoint(Ledgered):
    assignment: TaskAssigned
    status: Literal["recalling", "waiting_tools", "done", "failed", "cancelled"] = "recalling"
    """`cancelled`: the goal was stopped when this task was about to call the model; it resumes
    from here when the goal is reopened."""
    step: int = 0
    memories: list[MemoryHit] = []
    """The recalled memories, ranked; each step's context packs as many as its budget allows."""
    scratchpad: list[dict[str, Any]] = []
    """The model's turns and the tool replies, uncompressed (tool output already cut)."""
    pending: list[PendingCall] = []
    invalid_outputs: int = 0
    calls: list[list[str]] = []
    """Each step's tool calls as `tool:canonical-arguments`, for runaway detection."""
    seen_results: list[str] = []
    """Digests of the tool results so far; a step that brings back only these adds nothing."""
    stale_steps: int = 0
    findings: list[str] = []
    """Injection markers in tool replies that arrived since the last model call: they go on the
    record of the next call, the first to see that data."""
    reported: list[str] = []
    """Injection markers in the inputs and memories already on a call's record: a memory may be
    shown on many calls (or first on a later one, if it did not fit before) but is reported once."""
    subtasks: list[TaskAssigned] = []
    """The assignments of the subtasks this task delegated: they count against the fan-out limit,
    and are sent again, marked `resume`, when the goal resumes while this task waits for them."""


@dataclass(frozen=True)
class AgentDeps:
    kind: AgentKind
    model: str
    prompts: PromptLibrary
    """The kind's prompt (`kind.prompt`) is chosen from it per goal, at every step (the rollout)."""
    llm: LLMGateway
    ledger: StepLedger[TaskCheckpoint]
    keys: RedisKeys
    topics: Topics
    max_steps: int
    max_invalid_outputs: int
    recall_k: int
    tool_output_chars: int
    context_tokens: int
    budget: BudgetLedger
    runaway: RunawayLimits
    delegation: DelegationPolicy = DelegationPolicy()


@dataclass(frozen=True)
class ValidatedCall:
    call: ModelToolCall
    arguments: dict[str, Any]


def note_findings(cp: TaskCheckpoint, shown: Shown) -> str:
    """Keep the findings for the next model call's record; the text is what the model is shown."""
    if shown.findings:
        log.warning("task %s: injection markers in untrusted data: %s", cp.assignment.task_id, "; ".join(shown.findings))
        cp.findings += shown.findings
    return shown.text


def validate_call(kind: AgentKind, call: ModelToolCall) -> ValidatedCall | str:
    """The validated call, or an error message for the model."""
    allowed = delegation.offered_names(kind)
    if call.name not in allowed:
        return f"tool {call.name!r} is not allowed for agent kind {kind.name!r}; allowed: {list(allowed)}"
    spec = TOOL_SPECS[call.name]
    # JSON escapes can take six characters for one; beyond that it cannot fit once decoded.
    if len(call.raw_arguments) > 6 * MAX_ARGUMENTS_BYTES:
        return f"invalid arguments for {call.name}: more than {MAX_ARGUMENTS_BYTES} bytes"
    try:
        raw = json.loads(call.raw_arguments or "{}")
        args = spec.args.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        return f"invalid arguments for {call.name}: {exc}"
    arguments = args.model_dump(mode="json")
    size = arguments_size(arguments)
    if size > MAX_ARGUMENTS_BYTES:
        return f"invalid arguments for {call.name}: {size} bytes as JSON; the limit is {MAX_ARGUMENTS_BYTES}"
    if spec.executor == "agent":
        refused = delegation.target_error(kind, arguments)
        if refused:
            return refused
    return ValidatedCall(call, arguments)


def checkpoint_key(deps: AgentDeps, assignment: TaskAssigned) -> str:
    assert assignment.task_id is not None
    return deps.keys.task_checkpoint(assignment.tenant, assignment.task_id)


async def start_task(deps: AgentDeps, event: TaskAssigned) -> list[Outgoing]:
    async def step(cp: TaskCheckpoint | None) -> tuple[TaskCheckpoint | None, list[Outgoing]]:
        if cp is not None:
            if event.resume and cp.status == "cancelled":
                log.info("task %s resumes at step %d", event.task_id, cp.step)
                return cp, await think(deps, cp, event)
            if event.resume and cp.status in ("done", "failed"):
                # It ended while its goal was failed, so the orchestrator dropped the result: send
                # the same event again (same id, so it is applied once). A subtask's result is the
                # reply to the task that delegated it.
                ends = TaskCompleted | TaskFailed | ToolCallCompleted
                return None, [o.restore() for o in cp.outbox if isinstance(o.event, ends)]
            if event.resume and cp.status == "waiting_tools":
                waiting = {p.call_id for p in cp.pending if p.result is None}
                resent = delegation.resent(deps.topics, cp.subtasks, waiting, event)
                # Saved with the event applied, so a redelivered resume re-sends the same events.
                return (cp, resent) if resent else (None, [])
            return None, []  # already started under another assignment event
        cp = TaskCheckpoint(assignment=event)
        if event.delegated_by is not None and event.depth > deps.delegation.max_depth:
            # The delegating agent checks the bound; one configured with a looser bound than this
            # kind's is answered with the refusal, as a failed subtask (and no model call).
            detail = f"depth {event.depth} is beyond this kind's limit {deps.delegation.max_depth}"
            log.warning("task %s refused: %s", event.task_id, detail)
            return cp, fail(deps, cp, event, "delegation_depth", detail)
        if deps.recall_k == 0:
            return cp, await think(deps, cp, event)
        request = MemoryRecallRequested(
            **event.caused(), request_id=f"{event.task_id}:recall", query=event.instruction,
            k=deps.recall_k, reply_to=deps.topics.agent(deps.kind.name),
        )
        return cp, [Outgoing(deps.topics.memory, request, event.task_id or "")]

    return await deps.ledger.apply(checkpoint_key(deps, event), event.event_id, step)


async def resume_with_memories(deps: AgentDeps, event: MemoryRecallCompleted) -> list[Outgoing]:
    async def step(cp: TaskCheckpoint | None) -> tuple[TaskCheckpoint | None, list[Outgoing]]:
        if cp is None or cp.status != "recalling" or event.request_id != f"{event.task_id}:recall":
            return None, []  # stale or duplicate
        cp.memories = event.hits
        return cp, await think(deps, cp, event)

    key = deps.keys.task_checkpoint(event.tenant, event.task_id or "")
    return await deps.ledger.apply(key, event.event_id, step)


async def resume_with_tool_result(deps: AgentDeps, event: ToolCallCompleted) -> list[Outgoing]:
    async def step(cp: TaskCheckpoint | None) -> tuple[TaskCheckpoint | None, list[Outgoing]]:
        if cp is None or cp.status != "waiting_tools":
            return None, []
        pending = next((p for p in cp.pending if p.call_id == event.call_id and p.result is None), None)
        if pending is None:
            return None, []  # a duplicate result, or one for an earlier step
        body = event.output if event.ok else f"ERROR: {event.error}"
        # The source is the tool this task asked for, not what the result claims to be.
        pending.result = note_findings(cp, untrusted(f"tool:{pending.tool}", body, deps.tool_output_chars))
        if any(p.result is None for p in cp.pending):
            return cp, []
        take_results(deps, cp)
        return cp, await think(deps, cp, event)

    key = deps.keys.task_checkpoint(event.tenant, event.task_id or "")
    return await deps.ledger.apply(key, event.event_id, step)


def take_results(deps: AgentDeps, cp: TaskCheckpoint) -> None:
    """Every call of the step has its result: they join the scratchpad, and the step is checked
    for progress."""
    results = [p.result or "" for p in cp.pending]
    cp.stale_steps = stale_after(deps.runaway, cp.seen_results, cp.stale_steps, results)
    cp.seen_results += [result_digest(r) for r in results]
    cp.scratchpad += [
        {"role": "tool", "tool_call_id": p.model_call_id, "content": p.result} for p in cp.pending
    ]
    cp.pending = []


async def think(deps: AgentDeps, cp: TaskCheckpoint, cause: Any) -> list[Outgoing]:
    """Call the model until it asks for valid tools or answers. Mutates `cp`; returns outputs.

    A budget overrun or a runaway loop raises (the message is dead-lettered and the goal fails),
    carrying the records of the model calls already made; a stopped goal parks the task.
    """
    outputs: list[Outgoing] = []
    try:
        return await _think(deps, cp, cause, outputs)
    except GoalStopped as exc:
        log.info("task %s stops at step %d: %s", cp.assignment.task_id, cp.step, exc.why)
        cp.status = "cancelled"
        return outputs
    except Permanent as exc:
        exc.outputs = outputs + exc.outputs
        raise


async def _think(deps: AgentDeps, cp: TaskCheckpoint, cause: Any, outputs: list[Outgoing]) -> list[Outgoing]:
    task = cp.assignment
    task_id = task.task_id or ""
    tools = delegation.offered_tools(deps.kind, deps.delegation)
    # The same goal gets the same version on every step and replica; a rollback takes effect
    # at the task's next step after the agents restart with the new configuration.
    prompt = deps.prompts.for_goal(deps.kind.prompt, task.goal_id)
    while True:
        if cp.step >= deps.max_steps:
            return outputs + fail(deps, cp, cause, "max_steps", f"no answer after {cp.step} model calls")
        step_id = f"{task_id}:{cp.step}"
        context = assemble(
            system=prompt.text, task=task, memories=cp.memories, scratchpad=cp.scratchpad,
            budget_tokens=deps.context_tokens, tool_output_chars=deps.tool_output_chars,
        )
        new = [f for f in context.findings if f not in cp.reported]
        if new:
            log.warning("task %s: injection markers in untrusted data: %s", task_id, "; ".join(new))
        log.info("step %s: calling %s with %d context tokens (budget %d, the full history would be %d)",
                 step_id, deps.model, context.tokens, deps.context_tokens, context.full_history_tokens)
        completion = await deps.llm.complete(
            model=deps.model, prompt=prompt, messages=context.messages,
            purpose="step", agent=deps.kind.name, cause=cause, tools=tools or None, step_id=step_id,
            findings=cp.findings + new, context_tokens=context.tokens,
            full_history_tokens=context.full_history_tokens, cache=deps.kind.cache,
        )
        cp.findings = []
        cp.reported += new
        outputs.append(Outgoing(deps.topics.llm_calls, completion.record, task.goal_id))
        cp.step += 1
        cp.scratchpad.append(completion.assistant_message)
        if not completion.tool_calls:
            cp.status = "done"
            done = TaskCompleted(**cause.caused(), kind=deps.kind.name, result=completion.content or "", steps=cp.step)
            return outputs + delegation.ended(deps.topics, task, done)
        checked = [validate_call(deps.kind, c) for c in completion.tool_calls]
        errors = [c for c in checked if isinstance(c, str)]
        if errors:
            # Invalid output is a counted, bounded retry: the model sees what was wrong. Each
            # refused call is audited, like a refusal at the executor.
            outputs += [
                refusal_audit(deps, cause, f"{step_id}:{call.call_index}", call, result)
                for call, result in zip(completion.tool_calls, checked, strict=True)
                if isinstance(result, str)
            ]
            cp.invalid_outputs += 1
            if cp.invalid_outputs > deps.max_invalid_outputs:
                return outputs + fail(deps, cp, cause, "invalid_output", "; ".join(errors))
            for call, result in zip(completion.tool_calls, checked, strict=True):
                content = result if isinstance(result, str) else "not run: another call in this turn was invalid"
                model_id = completion.assistant_message["tool_calls"][call.call_index]["id"]
                cp.scratchpad.append({"role": "tool", "tool_call_id": model_id, "content": content})
            continue
        valid = [c for c in checked if not isinstance(c, str)]
        signatures = [call_signature(v.call.name, v.arguments) for v in valid]
        check_calls(deps.runaway, cp.calls, signatures)
        await deps.budget.charge_tool_calls(task.tenant, task.goal_id, len(valid))
        cp.calls.append(signatures)
        cp.status = "waiting_tools"
        cp.pending = []
        for v in valid:
            call_id = f"{step_id}:{v.call.call_index}"
            model_id = completion.assistant_message["tool_calls"][v.call.call_index]["id"]
            pending = PendingCall(call_id=call_id, model_call_id=model_id, tool=v.call.name)
            cp.pending.append(pending)
            if TOOL_SPECS[v.call.name].executor == "agent":
                outputs += delegate(deps, cp, cause, pending, step_id, v)
                continue
            request = ToolCallRequested(
                **cause.caused(task_id=task_id), call_id=call_id, step_id=step_id, tool=v.call.name,
                arguments=v.arguments, agent_kind=deps.kind.name, reply_to=deps.topics.agent(deps.kind.name),
            )
            outputs.append(Outgoing(deps.topics.executor(v.call.name), request, task_id))
        if any(p.result is None for p in cp.pending):
            return outputs
        # Every call was a refused delegation: the model is told at once, on the next turn.
        take_results(deps, cp)


def delegate(
    deps: AgentDeps, cp: TaskCheckpoint, cause: Any, pending: PendingCall, step_id: str, v: ValidatedCall,
) -> list[Outgoing]:
    """The subtask's assignment, or, beyond a bound, the refusal as the call's result, audited.

    A refusal is not an invalid output: the call was allowed and well-formed, and the platform
    declined it for where the task stands, as an executor's denial is (that too reaches the model
    as the call's result and counts no invalid turn)."""
    task = cp.assignment
    refused = delegation.refusal(deps.delegation, task, deps.kind.name, len(cp.subtasks))
    if refused is not None:
        reason, policy = refused
        log.info("task %s: %s", task.task_id, reason)
        shown = untrusted(f"tool:{pending.tool}", f"ERROR: {reason}", deps.tool_output_chars)
        pending.result = note_findings(cp, shown)
        return [refusal_audit(deps, cause, pending.call_id, v.call, reason, policy)]
    out = delegation.subtask(
        deps.topics, deps.kind.name, task, cause, pending.call_id, step_id, v.arguments, len(cp.subtasks) + 1,
    )
    assert isinstance(out.event, TaskAssigned)
    cp.subtasks.append(out.event)
    return [out]


def refusal_audit(
    deps: AgentDeps, cause: Any, call_id: str, call: ModelToolCall, error: str, policy: str | None = None,
) -> Outgoing:
    """The audit record of a tool call the agent refused before sending it."""
    # Without a policy, validate_call's refusal: every argument error says so; the rest are the
    # kind's allowlist (its tools, or the kinds it may delegate to).
    policy = policy or ("arguments" if error.startswith("invalid arguments") else "agent_allowlist")
    record = AuditRecorded(
        **cause.caused(task_id=cause.task_id), action=TOOL_DENIED, actor=deps.kind.name, subject=call_id,
        detail={"tool": call.name[:200], "policy": policy, "refused_by": "agent", "error": error[:1_000]},
    )
    return Outgoing(deps.topics.audit, record, cause.goal_id)


def fail(deps: AgentDeps, cp: TaskCheckpoint, cause: Any, reason: str, detail: str) -> list[Outgoing]:
    cp.status = "failed"
    failed = TaskFailed(
        **cause.caused(task_id=cp.assignment.task_id), kind=deps.kind.name, reason=reason, detail=detail,
        instruction=cp.assignment.instruction,
    )
    return delegation.ended(deps.topics, cp.assignment, failed)
