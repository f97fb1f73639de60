"""Settings shared by every service, read from the environment (and a .env file) in one place."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.budget import BudgetLimits
from services.runtime.errors import ConfigurationError
from services.runtime.latency import Latency


def settings_config(prefix: str) -> SettingsConfigDict:
    """How every Switchboard settings class reads the environment. `NAME=` counts as unset."""
    return SettingsConfigDict(env_prefix=prefix, env_file=".env", extra="ignore", env_ignore_empty=True)


def json_setting(value: Any, empty: Any, name: str = "") -> Any:
    """A JSON-valued setting as the environment gives it (text), parsed; empty text is `empty`.
    The error says where the JSON breaks, never what it holds (some settings hold secrets)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else empty
    except json.JSONDecodeError as exc:
        named = f"{name} is " if name else ""
        raise ValueError(f"{named}not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


class PlatformSettings(BaseSettings):
    model_config = settings_config("SWITCHBOARD_")

    namespace: str = Field(default="sb", pattern=r"^[A-Za-z0-9_-]+$")
    tenant: str = "default"
    partitions: int = Field(default=3, ge=1)
    data_dir: Path = Path(".switchboard")
    agents_dir: Path | None = None
    """Directory of agent kind definitions (*.toml) and their prompt files (<name>.v<N>.md);
    defaults to the packaged services/agents/kinds and services/agents/prompts."""
    goal_types_dir: Path | None = None
    """Directory of goal type definitions (*.toml): each type's fallback and escalation when its
    agent path fails; defaults to the packaged services/orchestrator/goal_types."""
    max_in_flight: int = Field(default=256, ge=1)
    """Messages one consumer group member works on at once, whatever the partition count."""
    retry_attempts: int = Field(default=4, ge=1)
    """Attempts a message gets for transient errors (model 429/5xx, timeouts, a Redis blip) before
    it is dead-lettered; each retry waits in `<topic>.retry.<n>`."""
    retry_backoff_s: float = Field(default=0.5, ge=0)
    """First backoff; it doubles per attempt, plus random jitter of up to the same amount."""
    retry_backoff_max_s: float = Field(default=30.0, ge=0)
    log_level: str = "INFO"
    status_interval_s: float = Field(default=5.0, gt=0)
    """How often a busy consumer logs its in-flight count."""
    instance: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    signing_key: SecretStr | None = None
    """HMAC key every service signs what it produces with, and tool executors verify requests with
    (services/runtime/signing.py). Unset: a development key anyone can read (`serve` warns)."""
    metrics_port: int = Field(default=9464, ge=0, le=65_535)
    """Port of the Prometheus endpoint (`GET /metrics`) of `switchboard serve`: one per process, for
    every role it runs. 0 turns it off. `switchboard run` serves none."""
    metrics_host: str = "0.0.0.0"
    """Address that endpoint listens on."""


class KafkaSettings(BaseSettings):
    model_config = settings_config("KAFKA_")

    bootstrap_servers: str | None = None
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 2_000
    replication_factor: int = 1
    revoke_grace_s: float = Field(default=10.0, ge=0)
    """On rebalance, how long in-flight work of revoked partitions may run on before it is abandoned."""
    commit_interval_ms: int = Field(default=100, ge=0)
    """Completions are gathered for this long into one offset commit."""

    def require(self) -> str:
        if not self.bootstrap_servers:
            raise ConfigurationError(
                "KAFKA_BOOTSTRAP_SERVERS is not set. Start local Kafka with `make infra-up` "
                "and export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092, or use `switchboard run` "
                "for the embedded mode."
            )
        return self.bootstrap_servers


class RedisSettings(BaseSettings):
    model_config = settings_config("REDIS_")

    url: str | None = None
    """None means an in-process store (embedded mode only)."""
    max_connections: int = Field(default=64, ge=1)
    """Connections per process. Handlers beyond it wait for one (up to `pool_timeout_s`), so many
    messages in flight share a bounded pool instead of failing with 'Too many connections'."""
    pool_timeout_s: float = Field(default=30.0, gt=0)


class QdrantSettings(BaseSettings):
    model_config = settings_config("QDRANT_")

    url: str | None = None
    """A Qdrant server. When unset, local mode on `path` is used (one process per path)."""
    path: str | None = None
    """Local-mode directory; defaults to <data_dir>/qdrant. ':memory:' keeps it in process."""
    api_key: str | None = None


class LLMSettings(BaseSettings):
    model_config = settings_config("LLM_")

    default_model: str = "offline/default"
    timeout_s: float = 60.0
    fallbacks: Annotated[list[dict[str, list[str]]], NoDecode] = Field(default_factory=list)
    """LiteLLM Router fallbacks, as JSON: [{"gpt-4o": ["claude-3-5-sonnet"]}]."""
    offline_latency_ms: str = "0"
    """Simulated latency of each offline-model call: "500", "uniform:200:800", "exponential:500"
    or "normal:500:100" (milliseconds). For realistic slow calls without a provider."""
    offline_cost_per_1k_tokens: float = Field(default=0.0, ge=0)
    """What the offline model charges per 1,000 tokens (input and output), so cost budgets can be
    exercised without a provider. Real models are priced from LiteLLM's cost map."""
    offline_script: str | None = None
    """`module:function` that decides each offline turn (the scripted form of the offline model)."""
    embedding_model: str | None = None
    """A LiteLLM embedding model; unset means the offline embedder (WordLlama, else hashing)."""
    embedding_dim: int = 1536
    """Vector size of `embedding_model` (the offline embedders set their own)."""
    cache_ttl_s: int = Field(default=86_400, gt=0)
    """How long a cached response is kept (agent kinds with `cache = true`). LiteLLM's own default
    is 60 s on Redis."""

    @field_validator("offline_latency_ms")
    @classmethod
    def _valid_latency(cls, value: str) -> str:
        Latency.parse(value)  # raises with the accepted forms
        return value

    @field_validator("fallbacks", mode="before")
    @classmethod
    def _parse_fallbacks(cls, value: Any) -> Any:
        return json_setting(value, [])


class TenantPolicy(BudgetLimits):
    """The most a tenant's goals may ask for, and what the tenant may spend per UTC day."""

    daily_cost_usd: float | None = Field(default=None, gt=0)


class BudgetSettings(BaseSettings):
    """Default per-goal limits (which are also the ceiling for tenants without a policy)."""

    model_config = settings_config("SWITCHBOARD_BUDGET_")

    max_steps: int | None = Field(default=60, ge=1)
    max_tokens: int | None = Field(default=250_000, ge=1)
    max_cost_usd: float | None = Field(default=5.0, gt=0)
    max_tool_calls: int | None = Field(default=100, ge=0)
    deadline_s: float | None = Field(default=1_800.0, gt=0)
    tenant_daily_cost_usd: float | None = Field(default=100.0, gt=0)
    """For tenants without a policy of their own."""
    tenant_policies: Annotated[dict[str, TenantPolicy], NoDecode] = Field(default_factory=dict)
    """Per-tenant ceilings, as JSON: {"acme": {"max_cost_usd": 20, "daily_cost_usd": 500}}.
    A limit a policy leaves out has no ceiling: the tenant's goals get the default and may ask for more."""
    output_estimate_tokens: int = Field(default=512, ge=0)
    """Output tokens a model call is assumed to take before the goal has made one; calls in flight
    reserve their estimate so that replicas together overshoot a limit by at most one call."""
    ttl_s: int = Field(default=7 * 86_400, ge=60)

    @field_validator("tenant_policies", mode="before")
    @classmethod
    def _parse_policies(cls, value: Any) -> Any:
        return json_setting(value, {}, "SWITCHBOARD_BUDGET_TENANT_POLICIES")

    @property
    def defaults(self) -> BudgetLimits:
        return BudgetLimits.model_validate(self.model_dump(include=set(BudgetLimits.model_fields)))

    def ceiling(self, tenant: str) -> BudgetLimits:
        policy = self.tenant_policies.get(tenant)
        if policy is None:
            return self.defaults
        return BudgetLimits.model_validate(policy.model_dump(include=set(BudgetLimits.model_fields)))

    def daily_cost(self, tenant: str) -> float | None:
        policy = self.tenant_policies.get(tenant)
        return self.tenant_daily_cost_usd if policy is None else policy.daily_cost_usd
