"""When a goal's agent path fails: its type's deterministic fallback, escalation to a person, or
failure. And the two ways such a goal still completes: the fallback's last call returns, or a
person answers it.

The fallback's tool calls go through the tool executors like an agent's (allowlisted for the
actor `fallback:<type>`, audited, run once), one after another, and answer to the goals topic.
No model is called on these paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas.envelope import Envelope
from schemas.events import (
    AnswerPath,
    GoalAnswered,
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalFallbackStarted,
    GoalLifecycleRejected,
    GoalStateChanged,
    GoalStateName,
    ToolCallCompleted,
    ToolCallRequested,
)
from services.orchestrator.lifecycle import IllegalTransition, requested, transition
from services.runtime.bus import Outgoing
from services.runtime.goal_types import GoalType, fill

if TYPE_CHECKING:
    from services.orchestrator.logic import GoalState, OrchestratorDeps


class FallbackRun(BaseModel):
    """A goal's fallback: why the agent path failed, and the outputs of its calls so far."""

    name: str
    reason: str
    detail: str = ""
    outputs: list[str] = []
    started: bool = False
    """False while the agents failed on a paused goal: the fallback starts when it is resumed."""
    attempt: int = 1
    """Which time the goal runs its fallback (a redrive lets the agents, then it, try again): its
    calls' ids carry it, so a late result of an earlier attempt is never taken for this one's."""


def fallback_task_id(goal_id: str) -> str:
    """The task id the fallback's tool calls carry: their results come back to the orchestrator."""
    return f"{goal_id}.fallback"


def fallback_call_id(goal_id: str, run: FallbackRun, index: int) -> str:
    return f"{fallback_task_id(goal_id)}:{run.attempt}:{index}"


def goal_type_of(deps: OrchestratorDeps, state: GoalState) -> GoalType | None:
    return deps.goal_types.types.get(state.goal.goal_type) if state.goal.goal_type else None


async def agent_path_failed(
    deps: OrchestratorDeps, state: GoalState, cause: Envelope, reason: str, detail: str,
    figures: dict[str, float] | None = None,
) -> list[Outgoing]:
    """The goal's agents (or its fallback) cannot finish it: stop them, then run the goal type's
    fallback if it has one not tried yet, else escalate if the type says so, else fail the goal."""
    goal_id = state.goal.goal_id
    await deps.budget.stop(state.goal.tenant, goal_id, reason)
    kind = goal_type_of(deps, state)
    origin = cause.model_copy(update={"task_id": None})
    if kind is not None and kind.fallback is not None and state.fallback is None:
        state.fallback_attempts += 1
        state.fallback = FallbackRun(
            name=kind.fallback_name, reason=reason, detail=detail, attempt=state.fallback_attempts,
        )
        if state.status == "paused":
            return []  # nothing runs while the goal is paused: the fallback starts at its resume
        if state.status != "running":
            state.status = transition(goal_id, state.status, "running")
        return continue_fallback(deps, state, origin)
    if kind is not None and kind.on_failure == "escalate":
        state.status = transition(goal_id, state.status, "waiting_for_human")
        escalated = GoalEscalated(
            **origin.caused(), reason=reason, detail=detail, goal_text=state.goal.text,
            task_results=completed_results(state),
        )
        return [Outgoing(deps.topics.progress, escalated, goal_id)]
    state.status = transition(goal_id, state.status, "failed")
    failed = GoalFailed(**origin.caused(), reason=reason, detail=detail, figures=figures or {})
    return [Outgoing(deps.topics.progress, failed, goal_id)]


def continue_fallback(deps: OrchestratorDeps, state: GoalState, cause: Envelope) -> list[Outgoing]:
    """Start the running goal's fallback, or go on with it after a pause: its next call, or the
    answer once every call has returned. A call that was in flight at the pause is asked again
    (its first result is applied, a second one is ignored; a side effect runs once)."""
    kind = goal_type_of(deps, state)
    run = state.fallback
    assert kind is not None and kind.fallback is not None and run is not None
    origin = cause.model_copy(update={"task_id": None})
    outputs: list[Outgoing] = []
    if not run.started:
        run.started = True
        started = GoalFallbackStarted(**origin.caused(), fallback=run.name, reason=run.reason, detail=run.detail)
        outputs.append(Outgoing(deps.topics.progress, started, state.goal.goal_id))
    if len(run.outputs) < len(kind.fallback.plan()):
        return outputs + [fallback_call(deps, state, kind, origin)]
    return outputs + [completed(deps, state, origin, answer_of(run), path="fallback")]


def completed_results(state: GoalState) -> dict[str, str]:
    results = {pid: t.result or "" for pid, t in state.tasks.items() if t.status == "completed"}
    if state.fallback is not None:
        results |= {f"fallback:{i + 1}": out for i, out in enumerate(state.fallback.outputs)}
    return results


def fallback_call(deps: OrchestratorDeps, state: GoalState, kind: GoalType, cause: Envelope) -> Outgoing:
    """The request for the fallback's next call, its arguments' placeholders filled in."""
    assert kind.fallback is not None and state.fallback is not None
    run = state.fallback
    index = len(run.outputs)
    step = kind.fallback.plan()[index]
    failure = f"{run.reason}: {run.detail}" if run.detail else run.reason
    arguments = fill(step.arguments, state.goal.text, failure[:4_000], run.outputs[-1] if run.outputs else "")
    task_id = fallback_task_id(state.goal.goal_id)
    call_id = fallback_call_id(state.goal.goal_id, run, index)
    request = ToolCallRequested(
        **cause.caused(task_id=task_id), call_id=call_id, step_id=call_id, tool=step.tool, arguments=arguments,
        agent_kind=kind.actor, reply_to=deps.topics.goals,
    )
    return Outgoing(deps.topics.executor(step.tool), request, task_id)


async def fallback_result(deps: OrchestratorDeps, event: ToolCallCompleted) -> list[Outgoing]:
    """One of the fallback's calls returned: the next call, or the goal's answer, which names the
    fallback; a call that failed fails the fallback (the goal escalates or fails). A result that
    returns while the goal is paused is kept; the resume goes on from it."""

    async def step(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is None or state.fallback is None or state.status not in ("running", "paused"):
            return None, []
        kind = goal_type_of(deps, state)
        index = len(state.fallback.outputs)
        if kind is None or kind.fallback is None or event.call_id != fallback_call_id(event.goal_id, state.fallback, index):
            return None, []  # a duplicate, or a call of an earlier attempt
        if not event.ok:
            detail = f"fallback {state.fallback.name} call {index} ({event.tool}) failed: {event.error}"
            return state, await agent_path_failed(deps, state, event, "fallback_failed", detail)
        state.fallback.outputs.append(event.output)
        if state.status == "paused":
            return state, []
        return state, continue_fallback(deps, state, event)

    key = deps.keys.goal_state(event.tenant, event.goal_id)
    return await deps.ledger.apply(key, event.event_id, step)


def answer_of(run: FallbackRun) -> str:
    """The last call's output: a fixed plan builds up to its last step, as a function returns once."""
    return run.outputs[-1] if run.outputs else ""


def completed(
    deps: OrchestratorDeps, state: GoalState, cause: Envelope, answer: str, path: AnswerPath,
    answered_by: str | None = None,
) -> Outgoing:
    """The goal's answer by its fallback or a person (the agents' answer is logic.finish's)."""
    state.status = transition(state.goal.goal_id, state.status, "completed")
    origin = cause.model_copy(update={"task_id": None})
    done = GoalCompleted(
        **origin.caused(), answer=answer, task_results=completed_results(state), path=path,
        fallback=state.fallback.name if path == "fallback" and state.fallback is not None else None,
        answered_by=answered_by,
    )
    return Outgoing(deps.topics.progress, done, state.goal.goal_id)


async def answered(deps: OrchestratorDeps, event: GoalAnswered) -> list[Outgoing]:
    """A person answers a goal waiting for one: it completes with that answer. Answered with
    GoalLifecycleRejected when the goal is not waiting for a person."""

    async def step(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is None:
            return None, [not_answered(deps, event, None, f"goal {event.goal_id} is unknown (tenant {event.tenant})")]
        before = state.status
        try:
            requested(event.goal_id, before, "answer")
        except IllegalTransition as exc:
            return None, [not_answered(deps, event, before, str(exc))]
        done = completed(deps, state, event, event.answer, path="human", answered_by=event.answered_by)
        changed = GoalStateChanged(
            **event.caused(task_id=None), from_state=before, to_state=state.status, action="answer",
            requested_by=event.answered_by,
        )
        return state, [Outgoing(deps.topics.progress, changed, event.goal_id), done]

    key = deps.keys.goal_state(event.tenant, event.goal_id)
    return await deps.ledger.apply(key, event.event_id, step)


def not_answered(deps: OrchestratorDeps, event: GoalAnswered, state: GoalStateName | None, detail: str) -> Outgoing:
    answer = GoalLifecycleRejected(
        **event.caused(task_id=None), action="answer", state=state, requested_by=event.answered_by, detail=detail,
    )
    return Outgoing(deps.topics.progress, answer, event.goal_id)
