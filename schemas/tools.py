"""Tool contracts: each tool's name, argument model and where it executes.

Agents validate a model's tool call against these before anything is sent, and the
executors validate again on receipt. Implementations live in the executing service.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ARGUMENTS_BYTES = 32 * 1024
"""The largest canonical JSON (UTF-8) of one tool call's arguments."""


def arguments_size(arguments: dict[str, Any]) -> int:
    """Bytes of the canonical JSON of `arguments`: sorted keys, no spaces, UTF-8."""
    return len(json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode())


class ToolArgs(BaseModel):
    """Strict: arguments arrive JSON-decoded, so a string stays a string and a number a number.
    `{"k": "3"}` or `{"expression": 5}` is refused, not coerced. Every string has a max_length."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CalculatorArgs(ToolArgs):
    expression: str = Field(min_length=1, max_length=200, description="Arithmetic, e.g. (2+3)*4^2")


class KnowledgeSearchArgs(ToolArgs):
    query: str = Field(min_length=1, max_length=1_000)
    k: int = Field(default=3, ge=1, le=10)


class HttpGetArgs(ToolArgs):
    url: str = Field(min_length=1, max_length=2_000, pattern=r"^https?://")


class SaveNoteArgs(ToolArgs):
    title: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1, max_length=20_000)


class RememberFactArgs(ToolArgs):
    subject: str = Field(min_length=1, max_length=200)
    """What the fact is about (`billing service port`). A later fact with the same subject (case,
    spacing and punctuation aside) is a newer version that supersedes this one."""
    fact: str = Field(min_length=1, max_length=2_000)


class FallbackFunctionArgs(ToolArgs):
    """What a function registered as a goal type's fallback is called with."""

    goal_text: str = Field(min_length=1, max_length=8_000)
    failure: str = Field(default="", max_length=4_000)
    """Why the agent path failed."""


class DelegateArgs(ToolArgs):
    kind: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$", description="The agent kind to hand the subtask to")
    instruction: str = Field(
        min_length=1, max_length=8_000, description="The subtask, self-contained: the other agent sees only this"
    )


DELEGATE = "delegate"
"""The tool an agent calls to hand a subtask to another agent kind (its kind's `delegates_to`)."""

Executor = Literal["tools", "memory", "agent"]
"""Where a tool runs: the tools executor, the memory service, or `agent`: the calling agent handles
it itself (`delegate`), so it is never sent to an executor."""


@dataclass(frozen=True)  # cached_property needs the instance __dict__ that frozen dataclasses keep
class ToolSpec:
    name: str
    description: str
    args: type[ToolArgs]
    executor: Executor = "tools"
    side_effect: bool = False

    @cached_property
    def openai_schema(self) -> dict[str, Any]:
        """The function-calling schema a model sees (built once: it is on every model call)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.args.model_json_schema(),
            },
        }


TOOL_SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec("calculator", "Evaluate an arithmetic expression exactly.", CalculatorArgs),
        ToolSpec(
            "kb_search",
            "Search the tenant's knowledge base (semantic memory) for facts.",
            KnowledgeSearchArgs,
            executor="memory",
        ),
        ToolSpec(
            "remember_fact",
            "Store a fact in the tenant's shared memory. A fact with the same subject replaces the "
            "older one; a fact already known is not stored twice.",
            RememberFactArgs,
            executor="memory",
        ),
        ToolSpec("http_get", "Fetch a URL from an allowlisted host.", HttpGetArgs),
        ToolSpec(
            "save_note",
            "Save a note (title and body) to the sandbox. Has a side effect.",
            SaveNoteArgs,
            side_effect=True,
        ),
        ToolSpec(
            DELEGATE,
            "Hand a subtask to another kind of agent and wait for its answer, which comes back as this "
            "call's result. Only the kinds named in `kind` are allowed; depth and count are limited.",
            DelegateArgs,
            executor="agent",
        ),
        ToolSpec(
            "arithmetic_answer",
            "Deterministic fallback: find the arithmetic expressions in a goal's text and compute "
            "each exactly. No model is involved.",
            FallbackFunctionArgs,
        ),
    )
}
