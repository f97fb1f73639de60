"""Versioned prompt files (`<name>.v<N>.md`) and their rollout: which version each goal gets.

Every model call records the version it used. A new version can be rolled out to a share of
goals, chosen by a stable hash of the goal id, and rolled back by configuration
(`SWITCHBOARD_PROMPT_ROLLOUT`). A replay pins the versions of the services it opens (`pinned`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode

from services.runtime.catalogue import PACKAGED_PROMPTS
from services.runtime.errors import ConfigurationError
from services.runtime.settings import json_setting, settings_config

_FILE = re.compile(r"^(?P<name>[a-z0-9_-]+)\.v(?P<version>\d+)(?P<draft>\.draft)?\.md$")
_VERSION = re.compile(r"^v?(\d+)$")

ORCHESTRATOR_PROMPTS = Path(__file__).resolve().parents[1] / "orchestrator" / "prompts"
"""The orchestrator's prompt files (`planner`, `editor`). With the agents' (PACKAGED_PROMPTS) they
make one namespace of prompt names."""

ROLLOUT_SETTING = "SWITCHBOARD_PROMPT_ROLLOUT"
BUCKETS = 100


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    text: str
    path: Path | None = field(default=None, compare=False)
    draft: bool = False
    """A `<name>.v<N>.draft.md` file: only used where the rollout names it."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """`researcher.v2`, as recorded in `LLMCallRecorded.prompt_version`."""
        return f"{self.name}.{self.version}"


def bucket(name: str, goal_id: str) -> int:
    """The goal's bucket (0..99) for prompt `name`: the first 8 bytes of BLAKE2b of
    `"<name>:<goal_id>"`, big-endian, modulo 100.

    It depends on nothing but these strings, so every process and replica puts a goal in the same
    bucket, on every step. The name is in the hash so that the canaries of different prompts
    fall on independent shares of goals.
    """
    digest = hashlib.blake2b(f"{name}:{goal_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class Rollout(BaseModel):
    """How one prompt is rolled out: goals in buckets below `percent` get `canary`, the rest `stable`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stable: str | None = None
    """Unset: the highest version that is not a draft."""
    canary: str | None = None
    percent: int = Field(default=0, ge=0, le=100)
    """Share of goals, 0 to 100, that get the canary. 0 (or no canary) is a rollback."""

    @field_validator("stable", "canary")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _VERSION.match(value.strip())
        if not match:
            raise ValueError(f"{value!r} is not a version such as v2")
        return f"v{int(match[1])}"


_pins: ContextVar[Mapping[str, Rollout]] = ContextVar("switchboard_prompt_pins", default={})


@contextmanager
def pinned(versions: Mapping[str, str]) -> Iterator[None]:
    """Every goal gets these versions (`{"researcher": "v2"}`) from the libraries `configured`
    within, whatever the rollout says: a replay runs the recorded versions, a what-if run another.
    A context variable, so services opened elsewhere in the process keep their rollout."""
    token = _pins.set({name: Rollout(stable=version) for name, version in versions.items()})
    try:
        yield
    finally:
        _pins.reset(token)


class PromptSettings(BaseSettings):
    model_config = settings_config("SWITCHBOARD_PROMPT_")

    rollout: Annotated[dict[str, Rollout], NoDecode] = Field(default_factory=dict)
    """Per prompt name, as JSON: {"researcher": {"stable": "v1", "canary": "v2", "percent": 10}}."""

    @field_validator("rollout", mode="before")
    @classmethod
    def _parse_rollout(cls, value: Any) -> Any:
        return json_setting(value, {})

    @classmethod
    def load(cls) -> PromptSettings:
        """The settings from the environment; a ConfigurationError naming the variable when they are wrong."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(_problem(e["loc"][1:], e["msg"]) for e in exc.errors())
            raise ConfigurationError(f"{ROLLOUT_SETTING} is invalid: {problems}") from exc


def _problem(where: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(map(str, where))}: {message}" if where else message


@dataclass(frozen=True)
class PromptRollout:
    """The resolved rollout of one prompt."""

    name: str
    stable: Prompt
    canary: Prompt | None
    percent: int

    def for_goal(self, goal_id: str) -> Prompt:
        if self.canary is not None and bucket(self.name, goal_id) < self.percent:
            return self.canary
        return self.stable


class PromptLibrary:
    """The prompt files of some directories (a later directory's file wins for the same name and
    version), with a rollout per name. Wrong rollout configuration raises at construction."""

    def __init__(self, *directories: Path, rollout: Mapping[str, Rollout] | None = None) -> None:
        self._prompts: dict[str, dict[int, Prompt]] = {}
        for directory in directories:
            seen: dict[tuple[str, int], Path] = {}
            for path in sorted(directory.glob("*.md")):
                match = _FILE.match(path.name)
                if not match:
                    continue
                name, number = match["name"], int(match["version"])
                if (name, number) in seen:
                    raise ConfigurationError(f"{path} and {seen[name, number]} are both {name}.v{number}")
                seen[name, number] = path
                prompt = Prompt(name, f"v{number}", path.read_text(), path, bool(match["draft"]))
                self._prompts.setdefault(name, {})[number] = prompt
        self._rollouts = {name: self._resolve(name, (rollout or {}).get(name)) for name in self._prompts}
        unknown = sorted(set(rollout or {}) - set(self._prompts))
        if unknown:
            raise ConfigurationError(
                f"{ROLLOUT_SETTING} names prompt(s) {', '.join(unknown)} that have no file; known: {', '.join(self.names())}"
            )

    @classmethod
    def configured(cls, agents_dir: Path | None = None) -> PromptLibrary:
        """Every prompt of the platform with the rollout from the environment, as every service
        and `switchboard prompts` see them. A custom catalogue (SWITCHBOARD_AGENTS_DIR) may ship
        prompt files beside its kinds; the orchestrator's own files still win for their versions."""
        directories = [PACKAGED_PROMPTS, *filter(None, [agents_dir]), ORCHESTRATOR_PROMPTS]
        return cls(*directories, rollout={**PromptSettings.load().rollout, **_pins.get()})

    def _resolve(self, name: str, rollout: Rollout | None) -> PromptRollout:
        versions = self._prompts[name]
        rollout = rollout or Rollout()

        def pick(version: str, role: str) -> Prompt:
            number = int(version[1:])
            if number not in versions:
                known = ", ".join(p.version for p in self.versions(name))
                raise ConfigurationError(f"{ROLLOUT_SETTING}: {role} version {version} of prompt {name!r} has no file; known: {known}")
            return versions[number]

        if rollout.stable is not None:
            stable = pick(rollout.stable, "stable")
        else:
            released = [n for n, p in versions.items() if not p.draft]
            if not released:
                raise ConfigurationError(
                    f"prompt {name!r} has only draft versions: name its stable version in {ROLLOUT_SETTING}"
                )
            stable = versions[max(released)]
        if rollout.canary is None and rollout.percent > 0:
            raise ConfigurationError(f"{ROLLOUT_SETTING}: prompt {name!r} has percent {rollout.percent} but no canary")
        canary = pick(rollout.canary, "canary") if rollout.canary is not None else None
        return PromptRollout(name, stable, canary, rollout.percent)

    def names(self) -> list[str]:
        return sorted(self._prompts)

    def versions(self, name: str) -> list[Prompt]:
        """Every version of the prompt, oldest first."""
        return [p for _, p in sorted(self._known(name).items())]

    def rollout(self, name: str) -> PromptRollout:
        self._known(name)
        return self._rollouts[name]

    def latest(self, name: str) -> Prompt:
        """The stable version: the configured one, else the highest that is not a draft."""
        return self.rollout(name).stable

    def for_goal(self, name: str, goal_id: str) -> Prompt:
        """The version goal `goal_id` gets: the canary iff `bucket(name, goal_id) < percent`."""
        return self.rollout(name).for_goal(goal_id)

    def _known(self, name: str) -> dict[int, Prompt]:
        versions = self._prompts.get(name)
        if not versions:
            raise ConfigurationError(f"no prompt file named {name}.v<N>.md (known: {self.names()})")
        return versions
