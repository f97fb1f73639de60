"""Scripted forms of the offline model that misbehave on purpose: a model that never stops, and one
that obeys every instruction it reads in tool output or memory."""

from __future__ import annotations

import json
import re
from typing import Any

from services.runtime.offline_model import ToolCall, Turn, default_turn, role_of


def parallel_plan(task_ids: list[str], kind: str = "researcher", instruction: str = "Work out {id}") -> str:
    """Independent tasks of one kind; `instruction` may name the task's `{id}`."""
    tasks = [{"id": t, "kind": kind, "instruction": instruction.format(id=t)} for t in task_ids]
    return json.dumps({"tasks": tasks})


_RESULT = re.compile(r"<tool_output>\n.*= (-?\d+)\n</tool_output>")


def looping(task_ids: list[str]) -> Any:
    """Plans `task_ids` as independent researcher tasks, then each task calls the calculator
    forever, with a new expression every time: nothing a loop detector could call a repeat."""

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        role = role_of(messages)
        if role == "planner":
            return Turn(content=parallel_plan(task_ids))
        if role == "editor":
            return default_turn(messages, tools)
        # Counts on from the latest result, which every context shows verbatim (older steps may
        # be summarised): each expression, and each result, is new.
        results = [int(n) for m in messages if m.get("role") == "tool" for n in _RESULT.findall(str(m.get("content")))]
        last = results[-1] if results else 0
        return Turn(tool_calls=[ToolCall("calculator", {"expression": f"{last} + {len(task_ids)}"})])

    return script


_CALL = re.compile(r"\bCALL\s+([A-Za-z0-9_]+)\s+(\{.*\})")
_ANSWER = re.compile(r"\bANSWER\s+(.+)")
_PLAN = re.compile(r"\bPLAN\s+(\{.*\})")


def latest_data(messages: list[dict[str, Any]]) -> str:
    """What the model read last: the tool results since its last turn or, before its first tool
    call, the task message with the recalled memories."""
    after_last_turn: list[str] = []
    for message in reversed(messages):
        if message.get("role") == "assistant":
            break
        if message.get("role") == "tool":
            after_last_turn.append(str(message.get("content") or ""))
    if after_last_turn:
        return "\n".join(reversed(after_last_turn))
    if any(m.get("role") == "assistant" for m in messages):
        return ""
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


def obedient(plan: list[str] | None = None, kind: str = "researcher", instruction: str = "Work out {id}") -> Any:
    """A fully compromised model: it does whatever the data it read last tells it to.

    A line `CALL <tool> <json arguments>` in the latest tool output or memory makes it call that
    tool (whether or not it was offered); `ANSWER <text>` makes it answer with that text. With no
    such line it behaves like the default offline model. As a planner it replies with the plan of
    a `PLAN <json>` line in the goal, whatever it holds; else it plans `plan` (tasks of `kind`
    with `instruction`), if given.
    """

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        role = role_of(messages)
        if role == "planner":
            goal = next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")
            ordered = _PLAN.search(goal)  # on every attempt: a corrected plan is asked for in vain
            if ordered:
                return Turn(content=ordered.group(1))
            if plan is not None:
                return Turn(content=parallel_plan(plan, kind, instruction))
        if role != "agent":
            return default_turn(messages, tools)
        data = latest_data(messages)
        calls = [ToolCall(name, json.loads(args)) for name, args in _CALL.findall(data)]
        if calls:
            return Turn(tool_calls=calls)
        answer = _ANSWER.search(data)
        if answer:
            return Turn(content=answer.group(1).strip())
        return default_turn(messages, tools)

    return script


_REFUSED = re.compile(r"ERROR: (delegation refused: [^\n]*)")
_TASK = re.compile(r"^Task: (.*)$", re.MULTILINE)


def other_kind(messages: list[dict[str, Any]]) -> str:
    """The packaged kind this agent is not: its system prompt says which one it is."""
    system = next((str(m.get("content") or "") for m in messages if m.get("role") == "system"), "")
    return "researcher" if "You are a writer" in system else "writer"


def delegating(plan_kind: str, delegators: tuple[str, ...] = ("researcher", "writer")) -> Any:
    """Plans one task of `plan_kind`, which the kinds in `delegators` hand on (researcher to writer,
    writer to researcher) with their own instruction, until a delegation is refused or a subtask
    answers; each then answers with what came back: the refusal's reason, or `<kind> found: ` and
    the first line of the subtask's answer. Kinds not in `delegators` behave as the default model."""

    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        role = role_of(messages)
        if role == "planner":
            goal = next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")
            return Turn(content=json.dumps({"tasks": [{"id": "t1", "kind": plan_kind, "instruction": goal}]}))
        if role != "agent":
            return default_turn(messages, tools)
        target = other_kind(messages)
        data = latest_data(messages)
        refused = _REFUSED.search(data)
        if refused:
            return Turn(content=f"stopped: {refused.group(1)}")
        if any(m.get("role") == "tool" for m in messages):
            body = re.search(r"<tool_output>\n(.*?)\n", data)
            return Turn(content=f"{target} found: {body.group(1) if body else data}")
        kind = "writer" if target == "researcher" else "researcher"
        if kind not in delegators or "delegate" not in tools:
            return default_turn(messages, tools)
        task = _TASK.search(next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), ""))
        return Turn(tool_calls=[ToolCall("delegate", {"kind": target, "instruction": task.group(1) if task else "help"})])

    return script
