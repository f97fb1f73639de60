"""Audit records: who or what did what to which subject, on the append-only `<ns>.audit` topic."""

from __future__ import annotations

from typing import Any

from schemas.events import AuditRecorded, ToolCallRequested

TOOL_EXECUTED = "tool.executed"
TOOL_DENIED = "tool.denied"


def tool_audit(request: ToolCallRequested, action: str, **detail: Any) -> AuditRecorded:
    """The audit record of what an executor did with a tool request: the requesting agent kind is
    the actor, the call is the subject."""
    return AuditRecorded(
        **request.caused(),
        action=action,
        actor=request.agent_kind or "unknown",
        subject=request.call_id,
        detail={"tool": request.tool, "goal": request.goal_id, "task": request.task_id, **detail},
    )
