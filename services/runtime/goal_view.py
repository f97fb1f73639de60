"""What readers outside the orchestrator (`switchboard goal status`, the HTTP gateway) read of a
goal's stored state: its status, its submission and its tasks. The orchestrator owns the document
(services/orchestrator/logic.py GoalState); this view ignores the rest of it, so neither reader
imports the orchestrator."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas.events import GoalStateName


class TaskStateView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: str
    status: str
    planned: dict[str, Any]
    """The planned task: `id`, `kind`, `instruction`, `depends_on`."""


class GoalStateView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: GoalStateName
    goal: dict[str, Any]
    """The GoalSubmitted event, as JSON."""
    tasks: dict[str, TaskStateView] = {}
