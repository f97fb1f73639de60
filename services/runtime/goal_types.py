"""Goal types declared as data: what happens to a goal of a type when its agent path fails.

A submission may carry a type label (`GoalSubmitted.goal_type`). Its type may declare a
deterministic fallback (a fixed plan of tool calls, or one named Python function registered as a
tool) and whether the goal escalates to a person instead of failing. The orchestrator runs the
fallback's calls through the tool executors as the actor `fallback:<type>`; the executors allow
that actor exactly the tools its fallback names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.tools import TOOL_SPECS
from services.runtime.catalogue import AgentCatalogue, load_definitions
from services.runtime.errors import ConfigurationError

PACKAGED_GOAL_TYPES = Path(__file__).resolve().parents[1] / "orchestrator" / "goal_types"
FALLBACK_ACTOR = "fallback:"
"""Tool calls of a fallback are made by `fallback:<goal type>` (ToolCallRequested.agent_kind)."""

GOAL_TEXT = "{goal_text}"
FAILURE = "{failure}"
PREVIOUS = "{previous}"
PLACEHOLDERS = (GOAL_TEXT, FAILURE, PREVIOUS)
"""What a step's string arguments may contain: the goal's text, why the agent path failed, and
the previous step's output. Replaced literally (never str.format: a goal's text may hold braces)."""


class FallbackStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Fallback(BaseModel):
    """A fixed plan of tool calls (`steps`), or one registered function (`function`), which is a
    tool taking `goal_text` and `failure` (schemas.tools.FallbackFunctionArgs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", pattern=r"^[a-z0-9_-]*$")
    """What the result names as its path; defaults to the function's name, else the goal type's."""
    steps: tuple[FallbackStep, ...] = ()
    function: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Fallback:
        if bool(self.steps) == bool(self.function):
            raise ValueError("a fallback has either `steps` (a fixed plan of tool calls) or `function`, not both or neither")
        return self

    def plan(self) -> tuple[FallbackStep, ...]:
        if self.function is not None:
            return (FallbackStep(tool=self.function, arguments={"goal_text": GOAL_TEXT, "failure": FAILURE}),)
        return self.steps


class GoalType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64)
    description: str = ""
    fallback: Fallback | None = None
    on_failure: Literal["fail", "escalate"] = "fail"
    """When the agent path fails with no fallback, or the fallback fails too: fail the goal, or
    escalate it to a person (it waits in `waiting_for_human`)."""

    @model_validator(mode="after")
    def _known_tools(self) -> GoalType:
        for step in self.fallback.plan() if self.fallback else ():
            spec = TOOL_SPECS.get(step.tool)
            if spec is None:
                raise ValueError(f"fallback tool {step.tool!r} is unknown; known tools are {sorted(TOOL_SPECS)}")
            if spec.executor == "agent":
                raise ValueError(f"fallback tool {step.tool!r} is handled by an agent, not an executor: a fallback cannot call it")
            try:  # arguments as they would be with every placeholder filled in
                spec.args.model_validate(fill(step.arguments, "text", "failure", "previous"))
            except ValidationError as exc:
                raise ValueError(f"invalid arguments for fallback tool {step.tool}: {exc}") from exc
        return self

    @property
    def fallback_name(self) -> str:
        if self.fallback is None:
            return ""
        return self.fallback.name or self.fallback.function or self.name

    @property
    def actor(self) -> str:
        return f"{FALLBACK_ACTOR}{self.name}"


def fill(arguments: dict[str, Any], goal_text: str, failure: str, previous: str) -> dict[str, Any]:
    """The step's arguments with the placeholders in its string values replaced."""
    values = {GOAL_TEXT: goal_text, FAILURE: failure, PREVIOUS: previous}

    def one(value: Any) -> Any:
        if isinstance(value, str):
            for placeholder, text in values.items():
                value = value.replace(placeholder, text)
            return value
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        if isinstance(value, list):
            return [one(v) for v in value]
        return value

    return {k: one(v) for k, v in arguments.items()}


class GoalTypes:
    def __init__(self, types: dict[str, GoalType]) -> None:
        self.types = types

    @classmethod
    def load(cls, directory: Path | None = None) -> GoalTypes:
        types = load_definitions(directory or PACKAGED_GOAL_TYPES, GoalType, "goal type")
        return cls({kind.name: kind for kind in types})

    def get(self, name: str) -> GoalType:
        """Raises ConfigurationError naming the known types."""
        try:
            return self.types[name]
        except KeyError:
            raise ConfigurationError(f"unknown goal type {name!r}; known goal types: {sorted(self.types)}") from None

    def allows(self, actor: str, tool: str) -> bool:
        """Whether `actor` (`fallback:<type>`) may call `tool`: only the tools its fallback names."""
        kind = self.types.get(actor.removeprefix(FALLBACK_ACTOR)) if actor.startswith(FALLBACK_ACTOR) else None
        return kind is not None and kind.fallback is not None and any(s.tool == tool for s in kind.fallback.plan())


def may_call(catalogue: AgentCatalogue, goal_types: GoalTypes, actor: str, tool: str) -> bool:
    """The executors' allowlist check: an agent kind may call the tools its definition lists, and a
    goal type's fallback (`fallback:<type>`) exactly the tools its fallback names."""
    kind = catalogue.kinds.get(actor)
    return (kind is not None and tool in kind.tools) or goal_types.allows(actor, tool)
