"""The goal's state machine: its states, the transitions allowed between them, and the one
function every change of a goal's status goes through."""

from __future__ import annotations

from typing import get_args

from schemas.events import GoalStateName, LifecycleAction
from services.runtime.errors import SwitchboardError

STATES: tuple[GoalStateName, ...] = get_args(GoalStateName)

TRANSITIONS: dict[GoalStateName, frozenset[GoalStateName]] = {
    # Submitting opens the budget; a goal asking for more than its tenant may fails right there.
    "submitted": frozenset({"planning", "failed"}),
    # A plan that cannot be made is a failed agent path: a fallback runs, or the goal escalates.
    "planning": frozenset({"running", "waiting_for_human", "failed", "cancelled"}),
    "running": frozenset({"paused", "waiting_for_human", "completed", "failed", "cancelled"}),
    # A task whose in-flight call ends in failure, or work dead-lettered while paused, ends the
    # agent path: the goal fails, runs its fallback, or escalates.
    "paused": frozenset({"running", "waiting_for_human", "failed", "cancelled"}),
    # The agent path failed and the goal's type escalates: a person answers it, or cancels it.
    "waiting_for_human": frozenset({"completed", "cancelled"}),
    "completed": frozenset(),
    # A redrive of its dead-lettered work reopens a failed goal (to planning, when the plan was).
    "failed": frozenset({"planning", "running"}),
    "cancelled": frozenset(),
}

REQUESTED: dict[LifecycleAction, GoalStateName] = {
    "cancel": "cancelled", "pause": "paused", "resume": "running", "answer": "completed",
}
"""The state each lifecycle request (or a person's answer) asks for."""

ALLOWED_FROM: dict[LifecycleAction, frozenset[GoalStateName]] = {
    "cancel": frozenset({"planning", "running", "paused", "waiting_for_human"}),
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
    "answer": frozenset({"waiting_for_human"}),
}
"""A request is narrower than the table: resume is from paused only (a failed goal is reopened by
a redrive, and a goal waiting for a person by that person's answer), and only a goal waiting for
a person can be answered."""


class IllegalTransition(SwitchboardError, ValueError):
    """A goal was asked to move to a state its current state does not lead to."""

    def __init__(self, message: str, goal_id: str, current: GoalStateName, target: GoalStateName) -> None:
        super().__init__(message)
        self.goal_id = goal_id
        self.current = current
        self.target = target


def transition(goal_id: str, current: GoalStateName, target: GoalStateName) -> GoalStateName:
    """`target`, if the table allows moving there from `current`; else raises IllegalTransition."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(s for s in STATES if s in TRANSITIONS[current])
        after = f"from {current} it can become {allowed}" if allowed else "it has ended"
        raise IllegalTransition(
            f"goal {goal_id} is {current}; it cannot become {target} ({after})", goal_id, current, target
        )
    return target


_DONE = {"cancel": "cancelled", "pause": "paused", "resume": "resumed", "answer": "answered"}


def requested(goal_id: str, current: GoalStateName, action: LifecycleAction) -> GoalStateName:
    """The state a lifecycle request moves the goal to; raises IllegalTransition when it may not."""
    target = REQUESTED[action]
    if current not in ALLOWED_FROM[action]:
        can = " or ".join(s for s in STATES if s in ALLOWED_FROM[action])
        raise IllegalTransition(
            f"goal {goal_id} is {current}; it cannot be {_DONE[action]} (only a goal that is {can} can)",
            goal_id, current, target,
        )
    return transition(goal_id, current, target)
