"""The project's exceptions. Each control-flow error says what happens to the message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from services.runtime.bus import Outgoing

DeadLetterReason = Literal[
    "poison",
    "schema_invalid",
    "unknown_event",
    "budget_exceeded",
    "runaway_loop",
    "tool_denied",
    "tool_failed",
    "retries_exhausted",
    "deadline_exceeded",
    "approval_denied",
    "replay_diverged",
]


class SwitchboardError(Exception):
    """Root of every Switchboard error."""


class ConfigurationError(SwitchboardError, ValueError):
    """The settings or the agent catalogue are wrong; raised at start-up, never per message."""


class Retryable(SwitchboardError):
    """A transient failure: the message is tried again after a backoff."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """When the failing side knows it will not recover sooner (an open circuit, a provider's
        Retry-After), the backoff is at least this long."""


class ConcurrentUpdate(Retryable):
    """Another replica changed the same state first (e.g. during a rebalance); reload and retry."""


class Permanent(SwitchboardError):
    """Trying again cannot help: the message goes to the dead-letter topic with its reason."""

    reason: DeadLetterReason = "tool_failed"

    def __init__(self, message: str, reason: DeadLetterReason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.outputs: list[Outgoing] = []
        """Events the failing step produced before it failed (e.g. the record of a model call
        that was made and paid for): they are produced along with the dead-letter record."""

    @property
    def figures(self) -> dict[str, float]:
        return {}


class PoisonMessage(Permanent):
    """The message cannot be decoded or fails its schema."""

    reason: DeadLetterReason = "poison"


class ToolDenied(Permanent):
    reason: DeadLetterReason = "tool_denied"

    def __init__(self, message: str, policy: str) -> None:
        super().__init__(message)
        self.policy = policy


class BudgetExceeded(Permanent):
    reason: DeadLetterReason = "budget_exceeded"

    def __init__(self, message: str, budget: str, limit: float, spent: float) -> None:
        super().__init__(message)
        self.budget = budget
        self.limit = limit
        self.spent = spent

    @property
    def figures(self) -> dict[str, float]:
        return {"limit": self.limit, "spent": self.spent}


class DeadlineExceeded(BudgetExceeded):
    reason: DeadLetterReason = "deadline_exceeded"


class RunawayLoop(Permanent):
    """The task repeats itself: the same call again and again, A-B-A-B, or steps that learn nothing."""

    reason: DeadLetterReason = "runaway_loop"

    def __init__(self, message: str, pattern: str) -> None:
        super().__init__(message)
        self.pattern = pattern


class GoalStopped(SwitchboardError):
    """The goal has ended (failed or stopped) while this task was still working: it stops at this
    step boundary, quietly. Not a failure of this message, so it is not dead-lettered."""

    def __init__(self, goal_id: str, why: str) -> None:
        super().__init__(f"goal {goal_id} was stopped: {why}")
        self.goal_id = goal_id
        self.why = why


class TransportFailure(SwitchboardError):
    """Output events could not be produced; the input must not be committed."""
