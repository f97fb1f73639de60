"""The project's exceptions. Each control-flow error says what happens to the message."""

from __future__ import annotations

from typing import Literal

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
]


class SwitchboardError(Exception):
    """Root of every Switchboard error."""


class ConfigurationError(SwitchboardError, ValueError):
    """The settings or the agent catalogue are wrong; raised at start-up, never per message."""


class Retryable(SwitchboardError):
    """A transient failure: the message is tried again after a backoff."""


class ConcurrentUpdate(Retryable):
    """Another replica changed the same state first (e.g. during a rebalance); reload and retry."""


class Permanent(SwitchboardError):
    """Trying again cannot help: the message goes to the dead-letter topic with its reason."""

    reason: DeadLetterReason = "tool_failed"

    def __init__(self, message: str, reason: DeadLetterReason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


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

    def __init__(self, message: str, limit: float, spent: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.spent = spent


class TransportFailure(SwitchboardError):
    """Output events could not be produced; the input must not be committed."""
