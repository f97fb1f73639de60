"""Agent kinds declared as data: a name, a system prompt, a model and the tools it may call."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.tools import DELEGATE, TOOL_SPECS
from services.runtime.errors import ConfigurationError

PACKAGED_KINDS = Path(__file__).resolve().parents[1] / "agents" / "kinds"
PACKAGED_PROMPTS = Path(__file__).resolve().parents[1] / "agents" / "prompts"


class AgentKind(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    description: str
    prompt: str
    model: str = "offline/default"
    tools: tuple[str, ...] = ()
    cache: bool = False
    """Answer this kind's model calls from the response cache when the same model, messages, tools
    and prompt version were answered before (services/runtime/llm.py). Off by default."""
    delegates_to: tuple[str, ...] = ()
    """The kinds this kind may hand subtasks to with the `delegate` tool, which it is offered only
    when this is not empty (services/agents/delegation.py)."""

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, tools: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(tools) - set(TOOL_SPECS))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known tools are {sorted(TOOL_SPECS)}")
        if DELEGATE in tools:
            # One allowlist for delegation, the one that names the kinds: a bare `delegate` would
            # allow every kind.
            raise ValueError(f"{DELEGATE!r} is not listed in tools: name the kinds it may reach in delegates_to")
        return tools


D = TypeVar("D", bound=BaseModel)


def load_definitions(directory: Path, model: type[D], what: str) -> list[D]:
    """Every `*.toml` file in `directory` as a `model`, in file name order. Raises
    ConfigurationError naming the file (`invalid <what> <path>: ...`)."""
    found: list[D] = []
    for path in sorted(directory.glob("*.toml")):
        try:
            found.append(model.model_validate(tomllib.loads(path.read_text())))
        except (ValidationError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"invalid {what} {path}: {exc}") from exc
    return found


class AgentCatalogue:
    def __init__(self, kinds: dict[str, AgentKind]) -> None:
        if not kinds:
            raise ConfigurationError("the agent catalogue is empty")
        for kind in kinds.values():
            unknown = sorted(set(kind.delegates_to) - set(kinds))
            if unknown:
                raise ConfigurationError(
                    f"agent kind {kind.name!r} delegates to unknown kinds {unknown}; known kinds: {sorted(kinds)}"
                )
        self.kinds = kinds

    @classmethod
    def load(cls, directory: Path | None = None) -> AgentCatalogue:
        kinds = load_definitions(directory or PACKAGED_KINDS, AgentKind, "agent definition")
        return cls({kind.name: kind for kind in kinds})

    def get(self, name: str) -> AgentKind:
        try:
            return self.kinds[name]
        except KeyError:
            raise ConfigurationError(f"unknown agent kind {name!r}; known kinds: {sorted(self.kinds)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.kinds))
