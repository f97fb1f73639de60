"""Delegation: an agent hands a subtask to another agent kind, and resumes when its result arrives.

A `delegate` call becomes a TaskAssigned on the other kind's inbox, in the same goal, so the
subtask's model calls count against the goal's budget. When the subtask ends, its result goes back
to the delegating task as the result of that call (a ToolCallCompleted), which resumes it like any
tool result. Depth and fan-out are bounded here: a call beyond a bound is refused, and the refusal
is the call's result, so the model can go on without it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from schemas.envelope import new_id, utcnow
from schemas.events import Delegation, TaskAssigned, TaskCompleted, TaskFailed, ToolCallCompleted
from schemas.tools import DELEGATE, TOOL_SPECS
from schemas.topics import Topics
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentKind

DEPTH_POLICY = "delegation_depth"
FANOUT_POLICY = "delegation_fanout"
"""The `policy` on the audit record of a `delegate` call refused for a bound."""


@dataclass(frozen=True)
class DelegationPolicy:
    max_depth: int = 2
    """A task at this depth (a planned task is 0) may not delegate."""
    max_fanout: int = 3
    """Subtasks one task may delegate in all."""
    targets: tuple[tuple[str, str], ...] = ()
    """(kind, description) of the kinds this agent may delegate to, as the model is shown them."""


def offered_names(kind: AgentKind) -> tuple[str, ...]:
    """The tools a kind may call: its allowlist, and `delegate` when it names kinds to delegate to."""
    return kind.tools + ((DELEGATE,) if kind.delegates_to else ())


def offered_tools(kind: AgentKind, policy: DelegationPolicy) -> list[dict[str, Any]]:
    """The function schemas the model is offered; `delegate`'s names the kinds it may reach.
    Built once per kind and policy (every step asks), a new list each time."""
    return list(_offered_tools(kind, policy))


@cache
def _offered_tools(kind: AgentKind, policy: DelegationPolicy) -> tuple[dict[str, Any], ...]:
    tools = [TOOL_SPECS[name].openai_schema for name in kind.tools]
    if kind.delegates_to:
        schema = copy.deepcopy(TOOL_SPECS[DELEGATE].openai_schema)
        described = dict(policy.targets)
        kinds = "; ".join(f"{k}: {described[k]}" if k in described else k for k in kind.delegates_to)
        schema["function"]["description"] += f" Kinds: {kinds}."
        schema["function"]["parameters"]["properties"]["kind"]["enum"] = list(kind.delegates_to)
        tools.append(schema)
    return tuple(tools)


def target_error(kind: AgentKind, arguments: dict[str, Any]) -> str | None:
    """Why a validated `delegate` call names a kind this kind may not delegate to, else None."""
    target = arguments["kind"]
    if target in kind.delegates_to:
        return None
    return f"agent kind {kind.name!r} may not delegate to {target!r}; it may delegate to: {list(kind.delegates_to)}"


def refusal(policy: DelegationPolicy, task: TaskAssigned, kind: str, delegated: int) -> tuple[str, str] | None:
    """Why this task's next `delegate` call is refused and under which policy; None within bounds.

    Depth comes first: at the depth limit no count of subtasks would be allowed."""
    if task.depth >= policy.max_depth:
        chain = " → ".join((*task.delegated_by.chain, kind) if task.delegated_by else (kind,))
        return f"delegation refused: depth limit {policy.max_depth} reached ({chain})", DEPTH_POLICY
    if delegated >= policy.max_fanout:
        detail = f"task {task.task_id} has delegated {delegated} subtasks already"
        return f"delegation refused: fan-out limit {policy.max_fanout} reached ({detail})", FANOUT_POLICY
    return None


def subtask(
    topics: Topics, kind: str, task: TaskAssigned, cause: Any, call_id: str, step_id: str,
    arguments: dict[str, Any], number: int,
) -> Outgoing:
    """The assignment of the `number`-th subtask of `task` (1-based). Its id follows from the
    delegating task's checkpoint, so applying the same event again makes the same subtask."""
    target = str(arguments["kind"])
    chain = (*task.delegated_by.chain, kind) if task.delegated_by else (kind,)
    child_id = f"{task.task_id}/{target}-{number}"
    assignment = TaskAssigned(
        **cause.caused(task_id=child_id), kind=target, instruction=arguments["instruction"],
        goal_text=task.goal_text, depth=task.depth + 1,
        delegated_by=Delegation(
            task_id=task.task_id or "", call_id=call_id, step_id=step_id, reply_to=topics.agent(kind), chain=chain,
        ),
    )
    return Outgoing(topics.agent(target), assignment, child_id)


def ended(topics: Topics, task: TaskAssigned, event: TaskCompleted | TaskFailed) -> list[Outgoing]:
    """Where a task's end goes: a planned task's to the orchestrator. A subtask's goes back to the
    task that delegated it, as its `delegate` call's result; the orchestrator does not know the
    subtask, so the TaskCompleted or TaskFailed itself goes to the progress topic, on the goal's
    record for observers (and for the memory service's outcomes and lessons)."""
    parent = task.delegated_by
    if parent is None:
        return [Outgoing(topics.goals, event, task.goal_id)]
    if isinstance(event, TaskCompleted):
        reply = {"ok": True, "output": event.result}
    else:
        failure = f"delegated task {task.task_id} ({task.kind}) failed: {event.reason}: {event.detail}"
        reply = {"ok": False, "output": "", "error": failure}
    answer = ToolCallCompleted(
        **event.caused(task_id=parent.task_id), call_id=parent.call_id, step_id=parent.step_id, tool=DELEGATE, **reply,
    )
    return [Outgoing(parent.reply_to, answer, parent.task_id), Outgoing(topics.progress, event, task.goal_id)]


def resent(topics: Topics, subtasks: Iterable[TaskAssigned], waiting: set[str], cause: TaskAssigned) -> list[Outgoing]:
    """A resumed goal reaches only the tasks the orchestrator knows: one that waits for subtasks
    sends their assignments again, marked `resume`, so a subtask parked by the stop continues
    from its checkpoint (one still running ignores it; one that ended sends its result again)."""
    return [
        Outgoing(
            topics.agent(child.kind),
            child.model_copy(update={"event_id": new_id(), "ts": utcnow(), "causation_id": cause.event_id, "resume": True}),
            child.task_id or "",
        )
        for child in subtasks
        if child.delegated_by is not None and child.delegated_by.call_id in waiting
    ]
