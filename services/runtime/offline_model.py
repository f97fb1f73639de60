"""The offline model: a deterministic LiteLLM custom provider, the default and the one tests use.

It plans, calls tools and answers through the same code path as a real model. Two forms, like
pydantic-ai's TestModel and FunctionModel: a default that decides by simple rules, and a scripted
form where a function decides each turn (tests use it to make the model loop or misbehave).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from litellm import ModelResponse
from litellm.llms.custom_llm import CustomLLM

from services.runtime.errors import ConfigurationError
from services.runtime.latency import Latency

PROVIDER = "offline"
_EXPRESSION = re.compile(r"[-(]*\d[\d.\s]*(?:[-+*/^%][\s(]*[-(]*\d[\d.\s)]*)+")
"""A run of numbers joined by operators: `12*7`, `(2+3) * 4^2`."""
_PART_SPLIT = re.compile(r"\s*(?:;|\?|\band then\b|\band\b)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """What the model says on one turn: text, tool calls, or both."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


Script = Callable[[list[dict[str, Any]], list[str]], Turn]
"""Decides a turn from the messages and the names of the tools offered."""


def find_expressions(text: str) -> list[str]:
    """The arithmetic expressions in `text`, in order (what the offline model hands the calculator,
    and the `arithmetic_answer` fallback computes)."""
    return [m.group(0).strip() for m in _EXPRESSION.finditer(text)]


def load_script(spec: str) -> Script:
    module_name, _, attr = spec.partition(":")
    try:
        script: Script = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"LLM_OFFLINE_SCRIPT={spec!r} does not name a function: {exc}") from exc
    return script


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def role_of(messages: list[dict[str, Any]]) -> str:
    """planner, editor or agent: the first line of the system prompt says which (`role: ...`)."""
    for message in messages:
        if message.get("role") == "system":
            first = str(message.get("content") or "").strip().splitlines()[:1]
            if first and first[0].lower().startswith("role:"):
                return first[0].split(":", 1)[1].strip().lower()
    return "agent"


def _user_text(messages: list[dict[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


def _section(text: str, name: str) -> str:
    match = re.search(rf"<{name}[^>]*>\n?(.*?)\n?</{name}>", text, re.DOTALL)
    return match.group(1).strip() if match else ""


def _first_line_after(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(label):
            return line[len(label):].strip()
    return ""


def plan_turn(messages: list[dict[str, Any]]) -> Turn:
    """Split the goal into research questions, then one writing task that uses all of them."""
    system = str(messages[0].get("content") or "")
    kinds = re.findall(r"^- ([a-z0-9_-]+):", system, re.MULTILINE)
    goal = _user_text(messages).strip()
    parts = [p.strip(" .,") for p in _PART_SPLIT.split(goal) if p.strip(" .,")][:3] or [goal]
    research = "researcher" if "researcher" in kinds else (kinds[0] if kinds else "researcher")
    tasks: list[dict[str, Any]] = [
        {"id": f"r{i}", "kind": research, "instruction": part, "depends_on": []}
        for i, part in enumerate(parts, start=1)
    ]
    if "writer" in kinds:
        tasks.append(
            {
                "id": "w1",
                "kind": "writer",
                "instruction": f"Write the answer to: {goal}",
                "depends_on": [t["id"] for t in tasks],
            }
        )
    return Turn(content=json.dumps({"tasks": tasks}))


def agent_turn(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
    user = _user_text(messages)
    task = _first_line_after(user, "Task:")
    results = [str(m.get("content") or "") for m in messages if m.get("role") == "tool"]
    if results or not tools:
        return Turn(content=_answer(task, user, results))
    calls: list[ToolCall] = []
    expressions = find_expressions(task)
    if "calculator" in tools and expressions:
        calls.append(ToolCall("calculator", {"expression": expressions[0]}))
    if "kb_search" in tools:
        calls.append(ToolCall("kb_search", {"query": task[:500] or "overview", "k": 2}))
    if "save_note" in tools:
        calls.append(ToolCall("save_note", {"title": task[:80] or "note", "body": _draft(task, user)}))
    return Turn(tool_calls=calls) if calls else Turn(content=_answer(task, user, []))


def _draft(task: str, user: str) -> str:
    inputs = _section(user, "inputs")
    lines = [f"# {task}"] + [line for line in inputs.splitlines() if line.strip()]
    return "\n".join(lines)


def _answer(task: str, user: str, results: list[str]) -> str:
    findings = []
    for result in results:
        body = _section(result, "tool_output") or result
        first = next((line for line in body.splitlines() if line.strip()), "")
        if first and first != "no matching facts" and not first.startswith("ERROR"):
            findings.append(first.strip()[:300])
    inputs = _section(user, "inputs")
    if inputs:  # a writing task: the answer is the findings it was given
        return "\n".join(line for line in inputs.splitlines() if line.strip())
    if not findings:
        return f"{task}: no findings."
    return f"{task}: " + " | ".join(findings)


def answer_turn(messages: list[dict[str, Any]]) -> Turn:
    """The final answer of a goal: the results of its last tasks, in order."""
    user = _user_text(messages)
    results = _section(user, "results")
    return Turn(content=results or user)


def default_turn(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
    role = role_of(messages)
    if role == "planner":
        return plan_turn(messages)
    if role == "editor":
        return answer_turn(messages)
    return agent_turn(messages, tools)


class OfflineModel(CustomLLM):
    """Registered with LiteLLM as the `offline/...` provider."""

    def __init__(self, latency: Latency | None = None, script: Script | None = None) -> None:
        super().__init__()
        self.latency = latency or Latency("fixed", 0.0)
        self.script = script
        self.calls = 0
        self._rng = random.Random()

    def decide(self, messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return (self.script or default_turn)(messages, tools)

    async def acompletion(self, model: str, messages: list[Any], *args: Any, **kwargs: Any) -> ModelResponse:
        optional = kwargs.get("optional_params") or {}
        tools = [t["function"]["name"] for t in optional.get("tools") or []]
        plain = [dict(m) for m in messages]
        started = time.perf_counter()
        self.calls += 1
        turn = self.decide(plain, tools)
        delay_ms = self.latency.sample_ms(self._rng)
        if delay_ms:  # the simulated provider latency: the call is slow, the process is not blocked
            remaining = delay_ms / 1000 - (time.perf_counter() - started)
            if remaining > 0:
                await asyncio.sleep(remaining)
        message: dict[str, Any] = {"role": "assistant", "content": turn.content}
        if turn.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments, sort_keys=True)},
                }
                for i, c in enumerate(turn.tool_calls)
            ]
        prompt_tokens = sum(estimate_tokens(str(m.get("content") or "")) for m in plain)
        completion_tokens = estimate_tokens(json.dumps(message))
        return ModelResponse(
            model=f"{PROVIDER}/{model}",
            choices=[{"index": 0, "message": message, "finish_reason": "tool_calls" if turn.tool_calls else "stop"}],
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )
