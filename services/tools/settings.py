"""Tool executor settings (env prefix TOOLS_): defaults for every tool, and per-tool overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode

from schemas.tools import TOOL_SPECS
from services.runtime.errors import ConfigurationError
from services.runtime.settings import json_setting, settings_config

EXECUTED_HERE = frozenset(name for name, spec in TOOL_SPECS.items() if spec.executor == "tools")


class ToolLimits(BaseModel):
    """How one tool is run in one replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(gt=0)
    """Timeout of one call, counted from when it has a slot."""
    concurrency: int = Field(ge=1)
    """Calls of this tool at once in this replica; more wait for a slot."""
    breaker_failures: int = Field(ge=1)
    """Consecutive failures that open the tool's circuit breaker."""
    breaker_reset_s: float = Field(gt=0)
    """How long an open circuit rejects calls before it lets one probe through."""


class ToolLimitsOverride(BaseModel):
    """One tool's entry in TOOLS_LIMITS: any field it leaves out keeps the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)
    breaker_failures: int | None = Field(default=None, ge=1)
    breaker_reset_s: float | None = Field(default=None, gt=0)


class ToolsSettings(BaseSettings):
    model_config = settings_config("TOOLS_")

    timeout_s: float = Field(default=10.0, gt=0)
    """Default timeout of one tool call, in seconds."""
    concurrency: int = Field(default=8, ge=1)
    """Default number of calls of one tool at once, per replica."""
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=30.0, gt=0)
    limits: Annotated[dict[str, ToolLimitsOverride], NoDecode] = Field(default_factory=dict)
    """Per-tool overrides as JSON: {"http_get": {"timeout_s": 5, "concurrency": 4}}."""
    sandbox_dir: Path | None = None
    """Where save_note writes; defaults to <SWITCHBOARD_DATA_DIR>/sandbox."""
    http_enabled: bool = False
    http_allowed_hosts: Annotated[frozenset[str], NoDecode] = frozenset()
    """Comma-separated host names http_get may fetch from."""
    http_max_bytes: int = Field(default=200_000, ge=1)
    http_headers: Annotated[dict[str, dict[str, SecretStr]], NoDecode] = Field(default_factory=dict)
    """Headers http_get sends to a host, as JSON: {"api.example.com": {"Authorization": "Bearer ..."}}.
    The executor's secrets: the model never supplies headers, and the values are redacted from
    tool output and logs."""

    needs_approval: Annotated[frozenset[str], NoDecode] = frozenset()
    """Comma-separated tools that run only once a person approves each call
    (`switchboard approvals list`, `switchboard approve ID`, `switchboard deny ID --reason ...`)."""
    approval_timeout_s: float = Field(default=3_600.0, gt=0)
    """An approval not decided within this many seconds is denied."""
    approval_sweep_s: float = Field(default=5.0, gt=0)
    """How often each executor looks for approvals whose time ran out."""

    @classmethod
    def from_env(cls) -> ToolsSettings:
        """The settings, or a ConfigurationError that names each bad variable."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(
                f"TOOLS_{str(e['loc'][0]).upper()}"
                + (f" [{'.'.join(str(p) for p in e['loc'][1:])}]" if len(e["loc"]) > 1 else "")
                + f": {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigurationError(f"invalid tool executor settings: {problems}") from exc

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("needs_approval", mode="before")
    @classmethod
    def _split_tools(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("needs_approval")
    @classmethod
    def _known_tools(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = sorted(value - EXECUTED_HERE)
        if unknown:
            raise ValueError(f"unknown tools {unknown}; this executor runs {sorted(EXECUTED_HERE)}")
        return value

    @field_validator("http_headers", mode="before")
    @classmethod
    def _parse_headers(cls, value: object) -> object:
        value = json_setting(value, {})
        if isinstance(value, dict):
            return {str(host).strip().lower(): headers for host, headers in value.items()}
        return value

    def secrets(self) -> list[str]:
        """Every configured secret value: what must never reach the model, the record or a log."""
        return [v.get_secret_value() for headers in self.http_headers.values() for v in headers.values()]

    @field_validator("limits", mode="before")
    @classmethod
    def _parse_limits(cls, value: object) -> object:
        value = json_setting(value, {})
        if isinstance(value, dict):
            unknown = sorted(set(value) - EXECUTED_HERE)
            if unknown:
                raise ValueError(f"unknown tools {unknown}; this executor runs {sorted(EXECUTED_HERE)}")
        return value

    def limits_for(self, tool: str) -> ToolLimits:
        override = self.limits.get(tool)
        defaults = ToolLimits(
            timeout_s=self.timeout_s,
            concurrency=self.concurrency,
            breaker_failures=self.breaker_failures,
            breaker_reset_s=self.breaker_reset_s,
        )
        if override is None:
            return defaults
        return defaults.model_copy(update=override.model_dump(exclude_none=True))
