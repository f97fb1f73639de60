"""The events of one goal's life, and the discriminated union used to decode them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from schemas.budget import BudgetLimits
from schemas.envelope import Envelope
from schemas.plan import Plan
from schemas.tools import MAX_ARGUMENTS_BYTES, arguments_size

MAX_TEXT = 64_000


class GoalSubmitted(Envelope):
    event_type: Literal["goal.submitted"] = "goal.submitted"
    text: str = Field(min_length=1, max_length=8_000)
    submitted_by: str = "cli"
    budget: BudgetLimits = Field(default_factory=BudgetLimits)
    """Lower limits than the tenant's policy, if the submitter wants them."""
    goal_type: str | None = Field(default=None, max_length=64, pattern=r"^[a-z0-9_-]+$")
    """A label naming the goal's type, which may declare a deterministic fallback or escalation to
    a person when the agent path fails (services/orchestrator/goal_types.py)."""


class GoalPlanned(Envelope):
    event_type: Literal["goal.planned"] = "goal.planned"
    plan: Plan
    model: str
    prompt_version: str
    budget: BudgetLimits = Field(default_factory=BudgetLimits)
    """The limits the goal runs under: the submission's, the defaults, capped by the tenant policy."""


AnswerPath = Literal["agent", "fallback", "human"]
"""What produced a goal's answer: the agents, the goal type's deterministic fallback, or a person."""


class GoalCompleted(Envelope):
    event_type: Literal["goal.completed"] = "goal.completed"
    answer: str = Field(max_length=MAX_TEXT)
    task_results: dict[str, str] = Field(default_factory=dict)
    path: AnswerPath = "agent"
    fallback: str | None = None
    """With path `fallback`: the fallback that produced the answer."""
    answered_by: str | None = None
    """With path `human`: who answered."""


class GoalFailed(Envelope):
    event_type: Literal["goal.failed"] = "goal.failed"
    reason: str
    detail: str = ""
    figures: dict[str, float] = Field(default_factory=dict)
    """For a budget overrun: the limit and the amount spent."""


class GoalReopened(Envelope):
    """A failed goal runs on: its dead-lettered work is being redriven."""

    event_type: Literal["goal.reopened"] = "goal.reopened"
    reason: str
    requested_by: str


GoalStateName = Literal[
    "submitted", "planning", "running", "paused", "waiting_for_human", "completed", "failed", "cancelled"
]
"""The states of a goal; services/orchestrator/lifecycle.py holds the transitions between them."""

LifecycleRequest = Literal["cancel", "pause", "resume"]
LifecycleAction = Literal["cancel", "pause", "resume", "answer"]
"""A lifecycle request, or `answer`: a person's GoalAnswered to a goal waiting for one."""


class GoalLifecycleRequested(Envelope):
    """Someone asks the orchestrator to cancel, pause or resume a goal (goals topic).

    It answers on the progress topic with GoalStateChanged, or GoalLifecycleRejected when the goal's
    state does not allow it."""

    event_type: Literal["goal.lifecycle_requested"] = "goal.lifecycle_requested"
    action: LifecycleRequest
    requested_by: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2_000)


class GoalStateChanged(Envelope):
    """A lifecycle request took effect: the goal moved from one state to another (progress topic)."""

    event_type: Literal["goal.state_changed"] = "goal.state_changed"
    from_state: GoalStateName
    to_state: GoalStateName
    action: LifecycleAction
    requested_by: str
    reason: str = ""


class GoalLifecycleRejected(Envelope):
    """A lifecycle request the goal's state does not allow (or for an unknown goal); nothing changed."""

    event_type: Literal["goal.lifecycle_rejected"] = "goal.lifecycle_rejected"
    action: LifecycleAction
    state: GoalStateName | None
    """The goal's state when the request arrived; None for a goal the orchestrator does not know."""
    requested_by: str
    detail: str


class GoalFallbackStarted(Envelope):
    """The agent path failed and the goal type's deterministic fallback runs instead (progress topic)."""

    event_type: Literal["goal.fallback_started"] = "goal.fallback_started"
    fallback: str
    reason: str
    """Why the agent path failed: the reason the goal would otherwise have failed with."""
    detail: str = ""


class GoalEscalated(Envelope):
    """The agent path failed with no fallback (or the fallback failed too), and the goal's type
    escalates: it waits for a person, who answers it (GoalAnswered) or cancels it (progress topic)."""

    event_type: Literal["goal.escalated"] = "goal.escalated"
    reason: str
    detail: str = ""
    goal_text: str
    task_results: dict[str, str] = Field(default_factory=dict)
    """What the tasks that completed found before the failure: context for the person."""


class GoalAnswered(Envelope):
    """A person's answer to a goal waiting for one (goals topic): the goal completes with it.

    Answered with GoalStateChanged, or GoalLifecycleRejected (action `answer`) when the goal is not
    waiting for a person."""

    event_type: Literal["goal.answered"] = "goal.answered"
    answer: str = Field(min_length=1, max_length=MAX_TEXT)
    answered_by: str = Field(min_length=1, max_length=200)


class WorkDeadLettered(Envelope):
    """Told to the orchestrator when a goal's message went to a dead-letter topic: the goal fails."""

    event_type: Literal["work.dead_lettered"] = "work.dead_lettered"
    reason: str
    detail: str = Field(default="", max_length=4_000)
    dead_event_type: str
    dead_event_id: str
    dlq_topic: str
    original_topic: str
    original_partition: int
    original_offset: int
    consumer_group: str
    figures: dict[str, float] = Field(default_factory=dict)


class AuditRecorded(Envelope):
    """One line of the append-only audit trail: who or what did what, to which subject."""

    event_type: Literal["audit.recorded"] = "audit.recorded"
    action: str
    actor: str
    subject: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Delegation(BaseModel):
    """Which task delegated a subtask, and where its `delegate` call waits for the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(min_length=1, max_length=256)
    call_id: str = Field(min_length=1, max_length=300)
    step_id: str = Field(min_length=1, max_length=300)
    reply_to: str = Field(min_length=1, max_length=300)
    """The delegating kind's inbox: the subtask's result goes there as a ToolCallCompleted."""
    chain: tuple[str, ...] = Field(min_length=1, max_length=16)
    """The kinds of the delegating tasks, from the planned task down to the one that delegated."""


class TaskAssigned(Envelope):
    event_type: Literal["task.assigned"] = "task.assigned"
    kind: str
    instruction: str = Field(max_length=8_000)
    goal_text: str = Field(max_length=8_000)
    inputs: dict[str, str] = Field(default_factory=dict)
    """Results of the tasks this one depends on, by planned task id."""
    resume: bool = False
    """Sent again when a failed goal is reopened or a paused one resumed: a task stopped mid-way
    continues from its checkpoint."""
    depth: int = Field(default=0, ge=0)
    """0 for a task of the plan; a delegated subtask is one deeper than the task that delegated it."""
    delegated_by: Delegation | None = None
    """Set on a subtask another agent delegated (its `delegate` call): its result goes back to that
    task as the call's result, not to the orchestrator."""

    @model_validator(mode="after")
    def _depth_matches_the_chain(self) -> TaskAssigned:
        chain = len(self.delegated_by.chain) if self.delegated_by else 0
        if self.depth != chain:
            raise ValueError(f"depth {self.depth} does not match the delegation chain of {chain} task(s)")
        return self


class TaskCompleted(Envelope):
    event_type: Literal["task.completed"] = "task.completed"
    kind: str
    result: str = Field(max_length=MAX_TEXT)
    steps: int


class TaskFailed(Envelope):
    event_type: Literal["task.failed"] = "task.failed"
    kind: str
    reason: str
    detail: str = ""
    instruction: str | None = Field(default=None, max_length=8_000)
    """What the task was asked, so its failure lesson says so whatever order events are read in."""


class ToolCallRequested(Envelope):
    event_type: Literal["tool.requested"] = "tool.requested"
    call_id: str
    step_id: str
    tool: str
    arguments: dict[str, Any]
    """At most MAX_ARGUMENTS_BYTES as canonical JSON, whatever the tool's own limits."""
    agent_kind: str
    reply_to: str

    @field_validator("arguments")
    @classmethod
    def _arguments_are_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = arguments_size(value)
        if size > MAX_ARGUMENTS_BYTES:
            raise ValueError(f"arguments are {size} bytes as canonical JSON; the limit is {MAX_ARGUMENTS_BYTES}")
        return value


class ToolCallCompleted(Envelope):
    event_type: Literal["tool.completed"] = "tool.completed"
    call_id: str
    step_id: str
    tool: str
    ok: bool
    output: str = Field(max_length=MAX_TEXT)
    error: str | None = None
    replayed: bool = False
    """True when the idempotency store answered and the tool did not run again."""


class ApprovalRequested(Envelope):
    """A tool that needs a person's approval was asked for: nothing runs until someone decides."""

    event_type: Literal["approval.requested"] = "approval.requested"
    approval_id: str
    call_id: str
    tool: str
    arguments: dict[str, Any]
    agent_kind: str
    expires_at: datetime
    """When an undecided approval is denied."""


class ApprovalDecided(Envelope):
    """A person (or the timeout) decided an approval; the tools executor acts on it."""

    event_type: Literal["approval.decided"] = "approval.decided"
    approval_id: str
    approved: bool
    decided_by: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2_000)


class MemoryHit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_id: str
    kind: str
    text: str
    score: float
    """Relevance after weighing quality and recency (the order hits are served in)."""
    source_goal: str | None = None
    label: str | None = None
    """Set on failure lessons (`FAILED (<cause>): do not repeat`): a past mistake, never an example."""
    version: int = 1
    """Facts: which version of the fact this is; only the current version is ever served."""


class MemoryRecallRequested(Envelope):
    event_type: Literal["memory.recall_requested"] = "memory.recall_requested"
    request_id: str
    query: str = Field(max_length=8_000)
    k: int = Field(default=3, ge=1, le=50)
    reply_to: str


class MemoryRecallCompleted(Envelope):
    event_type: Literal["memory.recall_completed"] = "memory.recall_completed"
    request_id: str
    hits: list[MemoryHit]


class LLMCallRecorded(Envelope):
    event_type: Literal["llm.call_recorded"] = "llm.call_recorded"
    purpose: Literal["plan", "step", "answer"]
    agent: str
    model: str
    prompt_version: str
    prompt_hash: str
    messages: list[dict[str, Any]]
    response: dict[str, Any]
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float
    step_id: str | None = None
    instance: str
    """Which replica made the call (host:pid)."""
    context_tokens: int | None = None
    """Estimated tokens of the context assembled for this call (agent steps)."""
    full_history_tokens: int | None = None
    """What the naive context would have cost: the task, its whole uncompressed scratchpad and
    every recalled memory, with nothing summarised or left out."""
    cache_hit: bool = False
    """Answered from the response cache: no model was called, and `input_tokens`, `output_tokens`
    and `cost_usd` (what was paid now) are 0."""
    saved_tokens: int = 0
    """On a cache hit, the tokens the cached response took when it was first paid for."""
    saved_cost_usd: float = 0.0
    """On a cache hit, what the cached response cost when it was first paid for."""
    findings: list[str] = Field(default_factory=list)
    """Injection markers found in the untrusted data this call saw first (tool output, memories,
    earlier tasks' results), e.g. `tool:calculator: instruction-like text 'you are now'`. They are
    evidence; they block nothing."""


Event = Annotated[
    GoalSubmitted
    | GoalPlanned
    | GoalCompleted
    | GoalFailed
    | GoalReopened
    | GoalLifecycleRequested
    | GoalStateChanged
    | GoalLifecycleRejected
    | GoalFallbackStarted
    | GoalEscalated
    | GoalAnswered
    | WorkDeadLettered
    | AuditRecorded
    | TaskAssigned
    | TaskCompleted
    | TaskFailed
    | ToolCallRequested
    | ToolCallCompleted
    | ApprovalRequested
    | ApprovalDecided
    | MemoryRecallRequested
    | MemoryRecallCompleted
    | LLMCallRecorded,
    Field(discriminator="event_type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

EVENT_TYPES: frozenset[str] = frozenset(
    cls.model_fields["event_type"].default
    for cls in (
        GoalSubmitted, GoalPlanned, GoalCompleted, GoalFailed, GoalReopened, WorkDeadLettered, AuditRecorded,
        GoalLifecycleRequested, GoalStateChanged, GoalLifecycleRejected, GoalFallbackStarted, GoalEscalated,
        GoalAnswered,
        TaskAssigned, TaskCompleted, TaskFailed,
        ToolCallRequested, ToolCallCompleted, ApprovalRequested, ApprovalDecided,
        MemoryRecallRequested, MemoryRecallCompleted, LLMCallRecorded,
    )
)


GoalEnd = Literal["completed", "failed", "cancelled"]


def goal_end(event: Envelope) -> GoalEnd | None:
    """How `event` ends its goal, or None when it does not: the one answer every reader of a goal's
    events (progress, trace, replay, top, metrics, the gateway's stream) goes by."""
    if isinstance(event, GoalCompleted):
        return "completed"
    if isinstance(event, GoalFailed):
        return "failed"
    if isinstance(event, GoalStateChanged) and event.to_state == "cancelled":
        return "cancelled"
    return None


def decode_event(raw: bytes) -> Event:
    """Parse one event from the wire. Raises ValueError (bad JSON) or ValidationError."""
    return EVENT_ADAPTER.validate_json(raw)
