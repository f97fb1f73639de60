"""Scripted forms of the offline model that misbehave on purpose: a model that never stops."""

from __future__ import annotations

import json
from typing import Any

from services.runtime.offline_model import ToolCall, Turn, default_turn, role_of


def parallel_plan(task_ids: list[str], kind: str = "researcher") -> str:
    return json.dumps({"tasks": [{"id": t, "kind": kind, "instruction": f"Work out {t}"} for t in task_ids]})


def looping(task_ids: list[str]) -> Any:
    """Plans `task_ids` as independent researcher tasks, then each task calls the calculator
    forever, with a new expression every time: nothing a loop detector could call a repeat."""

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        role = role_of(messages)
        if role == "planner":
            return Turn(content=parallel_plan(task_ids))
        if role == "editor":
            return default_turn(messages, tools)
        step = sum(1 for m in messages if m.get("role") == "assistant")
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{step} * 7 + {len(task_ids)}"})])

    return script
