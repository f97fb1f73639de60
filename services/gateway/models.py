"""The HTTP gateway's request and response bodies: what its OpenAPI document promises.

Request bodies carry the same limits as the events they become (schemas/events.py), so a body the
gateway accepts is always an event it can publish, and a bad one is a 422 before anything is sent.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.budget import BudgetLimits
from schemas.events import MAX_TEXT, AnswerPath, GoalStateName, LifecycleAction

GOAL_ID = r"^[A-Za-z0-9_.:-]{1,128}$"
"""Goal ids the gateway serves: what `g-<hex>` ids and the CLI's ids look like, within the
envelope's length limit."""
APPROVAL_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GoalRequest(_Body):
    """A goal to submit."""

    text: str = Field(min_length=1, max_length=8_000, description="What you want done, in plain words.")
    budget: BudgetLimits | None = Field(
        default=None,
        description="Lower limits than the tenant's policy allows; each one left out is the deployment's default.",
    )
    goal_type: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9_-]+$",
        description="A label naming the goal's type (a deterministic fallback, or escalation to a person).",
    )


class LifecycleRequest(_Body):
    reason: str = Field(default="", max_length=2_000, description="Why; announced with the change.")


class AnswerRequest(_Body):
    answer: str = Field(min_length=1, max_length=MAX_TEXT, description="A person's answer to a goal waiting for one.")


class ApproveRequest(_Body):
    reason: str = Field(default="", max_length=2_000)


class DenyRequest(_Body):
    reason: str = Field(min_length=1, max_length=2_000, description="Why; recorded on the dead letter and in the audit trail.")


class Problem(BaseModel):
    """Every error the gateway answers itself."""

    detail: str


class GoalAccepted(BaseModel):
    goal_id: str
    status: Literal["submitted"] = "submitted"
    events: str
    """Where the goal's progress streams (server-sent events)."""


class TaskStatus(BaseModel):
    id: str
    """The task's id in the plan."""
    task_id: str
    kind: str | None
    status: str


class GoalFailure(BaseModel):
    reason: str
    detail: str = ""


class GoalStatus(BaseModel):
    goal_id: str
    tenant: str
    state: GoalStateName
    text: str | None = None
    goal_type: str | None = None
    tasks: list[TaskStatus] = Field(default_factory=list)
    spent: dict[str, float] = Field(default_factory=dict)
    """What the goal has spent against its budget: steps, tokens, cost_usd, tool_calls."""
    limits: BudgetLimits | None = None
    in_flight: int = 0
    """Model calls under way."""
    answer: str | None = None
    path: AnswerPath | None = None
    fallback: str | None = None
    answered_by: str | None = None
    failure: GoalFailure | None = None
    escalation: Escalation | None = None
    """Set while the goal is waiting_for_human."""
    events: str


class Escalation(BaseModel):
    """Why a goal waits for a person, and what its tasks found: the context to answer it with."""

    reason: str
    detail: str = ""
    task_results: dict[str, str] = Field(default_factory=dict)
    answer_with: str
    """Where the person's answer goes (POST, `{"answer": "..."}`); or cancel the goal."""


class RequestAccepted(BaseModel):
    """A request was published; the orchestrator acts on it at the goal's next step boundary."""

    request_id: str
    """The published event's id (the orchestrator's answer carries it as its causation_id)."""
    goal_id: str
    action: LifecycleAction
    status: Literal["requested"] = "requested"
    detail: str = ""


class StateChanged(BaseModel):
    """The orchestrator's answer to a request: the goal's state changed."""

    request_id: str
    goal_id: str
    action: LifecycleAction
    status: Literal["changed"] = "changed"
    from_state: GoalStateName
    to_state: GoalStateName


class RequestRejected(BaseModel):
    """The orchestrator's answer to a request that the goal's state does not allow."""

    detail: str
    request_id: str
    state: GoalStateName | None


class PendingApproval(BaseModel):
    approval_id: str
    goal_id: str
    task_id: str | None
    tool: str
    arguments: dict[str, object]
    agent_kind: str
    expires_at: str
    """ISO 8601, UTC."""


class ApprovalSent(BaseModel):
    approval_id: str
    decision: Literal["approved", "denied"]
    request_id: str
    """The ApprovalDecided event's id."""
    status: Literal["sent"] = "sent"


class Health(BaseModel):
    status: Literal["ok"] = "ok"
