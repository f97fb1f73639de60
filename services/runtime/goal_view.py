"""What readers outside the orchestrator (`switchboard goal status`, the HTTP gateway) read of a
goal's stored state: its status, its submission and its tasks. The orchestrator owns the document
(services/orchestrator/logic.py GoalState); this view ignores the rest of it, so neither reader
imports the orchestrator."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from schemas.events import GoalStateName, GoalSubmitted
from schemas.plan import PlannedTask


class TaskStateView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: str
    status: str
    planned: PlannedTask


class GoalStateView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: GoalStateName
    goal: GoalSubmitted
    tasks: dict[str, TaskStateView] = {}
