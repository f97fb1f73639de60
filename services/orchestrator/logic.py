"""Orchestrator decisions: plan a goal, dispatch ready tasks, gather results into the final answer.

It also ends goals: a failed task, or any of the goal's work sent to a dead-letter topic, ends the
goal's agent path and stops it, so that every other task of the goal stops at its next step. The
goal then runs its type's fallback, waits for a person, or fails (fallback.py). A redrive reopens a
failed goal, and its stopped tasks continue from their checkpoints. Cancel, pause and
resume requests stop a goal, or let it run on, the same way. Every change of a goal's status goes
through the state machine in lifecycle.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from memory.keys import RedisKeys
from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalFailed,
    GoalLifecycleRejected,
    GoalLifecycleRequested,
    GoalPlanned,
    GoalReopened,
    GoalStateChanged,
    GoalStateName,
    GoalSubmitted,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    WorkDeadLettered,
)
from schemas.plan import Plan, PlannedTask
from schemas.topics import Topics
from services.orchestrator.fallback import FallbackRun, agent_path_failed, continue_fallback, fallback_task_id
from services.orchestrator.lifecycle import IllegalTransition, requested, transition
from services.runtime.budget import BudgetLedger
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError, Permanent
from services.runtime.goal_types import GoalTypes
from services.runtime.idempotency import Ledgered, StepLedger
from services.runtime.llm import LLMGateway
from services.runtime.prompts import Prompt, PromptLibrary

log = logging.getLogger("switchboard.orchestrator")

PLANNER = "planner"
EDITOR = "editor"
"""The prompts the orchestrator calls the model with; each goal gets its version by the rollout."""


class TaskRecord(BaseModel):
    planned: PlannedTask
    task_id: str
    status: Literal["pending", "assigned", "completed", "failed"] = "pending"
    result: str | None = None


class GoalState(Ledgered):
    goal: GoalSubmitted
    status: GoalStateName = "running"
    """Stored documents from before the state machine hold running, completed or failed: all still states."""
    plan: Plan | None = None
    tasks: dict[str, TaskRecord] = {}
    fallback: FallbackRun | None = None
    """Set once the agent path has failed and the goal type's fallback runs."""
    fallback_attempts: int = 0
    """How many times the fallback has started (a redrive may let it run again)."""
    refused: bool = False
    """Failed at submission (a budget above the tenant's policy, an unknown goal type): nothing to
    redrive, unlike a goal whose planning was dead-lettered."""


@dataclass(frozen=True)
class OrchestratorDeps:
    llm: LLMGateway
    ledger: StepLedger[GoalState]
    keys: RedisKeys
    topics: Topics
    catalogue: AgentCatalogue
    prompts: PromptLibrary
    model: str
    max_plan_attempts: int
    budget: BudgetLedger
    goal_types: GoalTypes = field(default_factory=lambda: GoalTypes({}))


def task_id_for(goal_id: str, planned_id: str) -> str:
    return f"{goal_id}.{planned_id}"


def ready_tasks(state: GoalState) -> list[TaskRecord]:
    """Pending tasks whose dependencies have all completed, in plan order."""
    done = {pid for pid, t in state.tasks.items() if t.status == "completed"}
    return [
        t for t in state.tasks.values()
        if t.status == "pending" and set(t.planned.depends_on) <= done
    ]


def sink_tasks(plan: Plan) -> list[PlannedTask]:
    """Tasks no other task depends on: their results make up the answer."""
    needed = {d for t in plan.tasks for d in t.depends_on}
    return [t for t in plan.tasks if t.id not in needed]


def planner_messages(deps: OrchestratorDeps, planner: Prompt, goal: GoalSubmitted) -> list[dict[str, Any]]:
    kinds = "\n".join(f"- {k.name}: {k.description}" for k in deps.catalogue.kinds.values())
    return [
        {"role": "system", "content": f"{planner.text.rstrip()}\n{kinds}\n"},
        {"role": "user", "content": goal.text},
    ]


def parse_plan(content: str | None, kinds: set[str]) -> Plan:
    """Raises ValueError (including pydantic's ValidationError) with a message the model can act on."""
    plan = Plan.model_validate_json(content or "")
    plan.check_kinds(kinds)
    return plan


def assign(state: GoalState, record: TaskRecord, topics: Topics, cause: Any, resume: bool = False) -> Outgoing:
    record.status = "assigned"
    inputs = {
        dep: state.tasks[dep].result or "" for dep in record.planned.depends_on
    }
    event = TaskAssigned(
        **cause.caused(task_id=record.task_id),
        kind=record.planned.kind,
        instruction=record.planned.instruction,
        goal_text=state.goal.text,
        inputs=inputs,
        resume=resume,
    )
    return Outgoing(topics.agent(record.planned.kind), event, record.task_id)


def failed_goal(deps: OrchestratorDeps, cause: Any, reason: str, detail: str, figures: dict[str, float] | None = None) -> Outgoing:
    event = GoalFailed(**cause.caused(task_id=None), reason=reason, detail=detail, figures=figures or {})
    return Outgoing(deps.topics.progress, event, cause.goal_id)


async def plan_goal(deps: OrchestratorDeps, goal: GoalSubmitted) -> list[Outgoing]:
    """Accept the goal (its budget and type are checked, its state stored as planning), then plan
    it. Two steps, so that a planning attempt that ends in a dead letter finds the goal's state
    (and its type's fallback) there; a redelivered submission repeats neither."""
    key = deps.keys.goal_state(goal.tenant, goal.goal_id)

    async def accept(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is not None:
            return None, []  # accepted already under another event id
        try:
            limits = deps.budget.limits_for(goal.tenant, goal.budget)
            if goal.goal_type is not None:
                deps.goal_types.get(goal.goal_type)
        except ValueError as exc:  # ConfigurationError is one
            reason = "unknown_goal_type" if isinstance(exc, ConfigurationError) else "budget_policy"
            failed = GoalState(goal=goal, status=transition(goal.goal_id, "submitted", "failed"), refused=True)
            return failed, [failed_goal(deps, goal, reason, str(exc))]
        await deps.budget.open(goal.tenant, goal.goal_id, limits, goal.ts)
        return GoalState(goal=goal, status=transition(goal.goal_id, "submitted", "planning")), []

    async def plan(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is None or state.status != "planning" or state.goal.event_id != goal.event_id:
            return None, []  # failed at acceptance, cancelled meanwhile, or another submission's
        outputs: list[Outgoing] = []
        try:
            made = await make_plan(deps, goal, outputs)
        except Permanent as exc:
            # E.g. the budget ran out: the submission is dead-lettered with the records of the calls
            # made, and the dead letter finds the goal accepted (its type decides what follows).
            exc.outputs = outputs + exc.outputs
            raise
        if isinstance(made, str):
            return state, outputs + await agent_path_failed(deps, state, goal, "invalid_plan", made)
        state.status = transition(goal.goal_id, state.status, "running")
        state.plan = made
        state.tasks = {t.id: TaskRecord(planned=t, task_id=task_id_for(goal.goal_id, t.id)) for t in made.tasks}
        planned = GoalPlanned(
            **goal.caused(), plan=made, model=deps.model, budget=deps.budget.limits_for(goal.tenant, goal.budget),
            prompt_version=deps.prompts.for_goal(PLANNER, goal.goal_id).label,
        )
        outputs.append(Outgoing(deps.topics.progress, planned, goal.goal_id))
        return state, outputs + [assign(state, t, deps.topics, goal) for t in ready_tasks(state)]

    accepted = await deps.ledger.apply(key, f"{goal.event_id}:accepted", accept)
    return accepted + await deps.ledger.apply(key, goal.event_id, plan)


async def make_plan(deps: OrchestratorDeps, goal: GoalSubmitted, outputs: list[Outgoing]) -> Plan | str:
    """A valid plan from the model, or why none came within the attempts. Appends each call's record
    to `outputs`; raises Permanent (e.g. the budget ran out)."""
    planner = deps.prompts.for_goal(PLANNER, goal.goal_id)
    messages = planner_messages(deps, planner, goal)
    error = ""
    for _ in range(deps.max_plan_attempts):
        completion = await deps.llm.complete(
            model=deps.model, prompt=planner, messages=messages, purpose="plan",
            agent="orchestrator", cause=goal, json_mode=True,
        )
        outputs.append(Outgoing(deps.topics.llm_calls, completion.record, goal.goal_id))
        try:
            return parse_plan(completion.content, set(deps.catalogue.names))
        except (ValidationError, ValueError) as exc:
            error = str(exc)
            messages = messages + [
                completion.assistant_message,
                {"role": "user", "content": f"That plan is invalid: {error}\nReply with a corrected plan."},
            ]
    return f"no valid plan after {deps.max_plan_attempts} attempts: {error}"


async def record_task_result(deps: OrchestratorDeps, event: TaskCompleted | TaskFailed) -> list[Outgoing]:
    async def step(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is None or state.status not in ("running", "paused", "cancelled"):
            return None, []  # unknown goal, or it ended already: nothing to do
        record = next((t for t in state.tasks.values() if t.task_id == event.task_id), None)
        if record is None or record.status in ("completed", "failed"):
            return None, []
        if isinstance(event, TaskFailed):
            record.status = "failed"
            if state.status == "cancelled" or state.fallback is not None:
                return state, []  # the call in flight at the cancel or the failure failed: recorded, nothing follows
            detail = f"task {record.planned.id} ({event.kind}) failed: {event.detail}"
            return state, await agent_path_failed(deps, state, event, f"task_failed:{event.reason}", detail)
        record.status = "completed"
        record.result = event.result
        if state.status != "running" or state.fallback is not None:
            # Finished by a call in flight at the pause, the cancel or the agent path's failure: the
            # result is kept, and starts nothing now (a resume starts what it lets start).
            return state, []
        return state, await advance(deps, state, event)

    key = deps.keys.goal_state(event.tenant, event.goal_id)
    return await deps.ledger.apply(key, event.event_id, step)


async def advance(deps: OrchestratorDeps, state: GoalState, cause: Envelope) -> list[Outgoing]:
    """Start the tasks whose inputs are all in; when every task has completed, the answer."""
    outputs = [assign(state, t, deps.topics, cause) for t in ready_tasks(state)]
    if all(t.status == "completed" for t in state.tasks.values()):
        outputs += await finish(deps, state, cause)
    return outputs


async def finish(deps: OrchestratorDeps, state: GoalState, cause: Envelope) -> list[Outgoing]:
    assert state.plan is not None
    sinks = sink_tasks(state.plan)
    if len(sinks) == 1:
        results = state.tasks[sinks[0].id].result or ""
    else:
        results = "\n".join(f"- {t.id}: {state.tasks[t.id].result}" for t in sinks)
    editor = deps.prompts.for_goal(EDITOR, state.goal.goal_id)
    messages = [
        {"role": "system", "content": editor.text},
        {"role": "user", "content": f"Goal: {state.goal.text}\n<results>\n{results}\n</results>"},
    ]
    origin = cause.model_copy(update={"task_id": None})
    completion = await deps.llm.complete(
        model=deps.model, prompt=editor, messages=messages, purpose="answer",
        agent="orchestrator", cause=origin,
    )
    state.status = transition(state.goal.goal_id, state.status, "completed")
    done = GoalCompleted(
        **origin.caused(),
        answer=completion.content or results,
        task_results={pid: t.result or "" for pid, t in state.tasks.items()},
    )
    return [
        Outgoing(deps.topics.llm_calls, completion.record, state.goal.goal_id),
        Outgoing(deps.topics.progress, done, state.goal.goal_id),
    ]


async def fail_on_dead_letter(deps: OrchestratorDeps, event: WorkDeadLettered) -> list[Outgoing]:
    """Work of the goal went to a dead-letter topic: its agent path has failed (or its fallback's,
    when the work was the fallback's call), and its other tasks stop. Work of the agent path
    dead-lettered once the goal runs its fallback or waits for a person changes nothing."""

    async def step(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        where = f"{event.dead_event_type} on {event.original_topic} (now in {event.dlq_topic})"
        detail = f"{where}: {event.detail}"
        if state is None:
            # The goal never got a state (its submission itself failed): still tell the submitter.
            await deps.budget.stop(event.tenant, event.goal_id, event.reason)
            return None, [failed_goal(deps, event, event.reason, detail, event.figures)]
        if state.status not in ("planning", "running", "paused"):
            return None, []
        reason = event.reason
        if state.fallback is not None:
            if event.task_id != fallback_task_id(event.goal_id):
                return None, []
            reason, detail = f"fallback_failed:{event.reason}", f"fallback {state.fallback.name}: {detail}"
        return state, await agent_path_failed(deps, state, event, reason, detail, event.figures)

    key = deps.keys.goal_state(event.tenant, event.goal_id)
    return await deps.ledger.apply(key, event.event_id, step)


async def reopen(deps: OrchestratorDeps, event: GoalReopened) -> list[Outgoing]:
    """A redrive reopens a goal that failed on dead-lettered work. Its tasks that were stopped
    mid-way are sent again, marked `resume`: each continues from its checkpoint (a task that is
    still running ignores it). A goal whose planning was dead-lettered goes back to planning, and
    the redriven submission plans it. A task that failed outright cannot be redriven, so neither
    can its goal; nor can a goal in any other state. Whatever is not reopened stays stopped: the
    redrive cleared the budget's stop flag for its work."""

    async def step(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is None:
            return None, []
        failed = [pid for pid, t in state.tasks.items() if t.status == "failed"]
        if state.status != "failed" or failed or state.refused:
            why = f"task {failed[0]} failed" if failed else state.status
            if failed:
                log.warning("goal %s not reopened: task %s failed outright", event.goal_id, failed[0])
            await deps.budget.stop(event.tenant, event.goal_id, why)
            return None, []
        state.fallback = None  # the agents try again; should they fail again, so may the fallback
        if state.plan is None:
            state.status = transition(event.goal_id, state.status, "planning")
            await deps.budget.reopen(event.tenant, event.goal_id)
            return state, []
        state.status = transition(event.goal_id, state.status, "running")
        return state, await resume_tasks(deps, state, event)

    key = deps.keys.goal_state(event.tenant, event.goal_id)
    return await deps.ledger.apply(key, event.event_id, step)


async def resume_tasks(deps: OrchestratorDeps, state: GoalState, cause: Envelope) -> list[Outgoing]:
    """Let the stopped goal run again: its budget admits calls, and its tasks that were assigned
    are sent again, marked `resume`. A task parked by the stop continues from its checkpoint; one
    still running ignores it; one that ended meanwhile sends its result again."""
    await deps.budget.reopen(cause.tenant, state.goal.goal_id)
    resumed = [t for t in state.tasks.values() if t.status == "assigned"]
    return [assign(state, t, deps.topics, cause, resume=True) for t in resumed]


async def change_lifecycle(deps: OrchestratorDeps, event: GoalLifecycleRequested) -> list[Outgoing]:
    """Cancel, pause or resume a goal. Cancel and pause stop its budget, so every task of it parks
    at its next model call on every replica (calls in flight finish, and their results are kept);
    resume lets it run on from the checkpoints. A request its state does not allow changes
    nothing: it is answered with GoalLifecycleRejected."""

    async def step(state: GoalState | None) -> tuple[GoalState | None, list[Outgoing]]:
        if state is None:
            return None, [rejected(deps, event, None, f"goal {event.goal_id} is unknown (tenant {event.tenant})")]
        before = state.status
        try:
            state.status = requested(event.goal_id, before, event.action)
        except IllegalTransition as exc:
            log.info("%s of goal %s rejected: %s", event.action, event.goal_id, exc)
            return state, [rejected(deps, event, before, str(exc))]
        changed = GoalStateChanged(
            **event.caused(task_id=None), from_state=before, to_state=state.status, action=event.action,
            requested_by=event.requested_by, reason=event.reason,
        )
        outputs = [Outgoing(deps.topics.progress, changed, event.goal_id)]
        if state.status == "running" and state.fallback is not None:
            # The agents failed: their tasks stay stopped, and the fallback goes on (or starts).
            outputs += continue_fallback(deps, state, event)
        elif state.status == "running":
            outputs += await resume_tasks(deps, state, event)
            outputs += await advance(deps, state, event)  # results that came in while it was paused
        else:
            await deps.budget.stop(event.tenant, event.goal_id, state.status)
        log.info("goal %s is %s (was %s), by %s", event.goal_id, state.status, before, event.requested_by)
        return state, outputs

    key = deps.keys.goal_state(event.tenant, event.goal_id)
    return await deps.ledger.apply(key, event.event_id, step)


def rejected(deps: OrchestratorDeps, event: GoalLifecycleRequested, state: GoalStateName | None, detail: str) -> Outgoing:
    answer = GoalLifecycleRejected(
        **event.caused(task_id=None), action=event.action, state=state, requested_by=event.requested_by, detail=detail,
    )
    return Outgoing(deps.topics.progress, answer, event.goal_id)
