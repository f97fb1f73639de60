"""HTTP gateway settings (env prefix GATEWAY_): where it listens, the API keys and their tenants,
and how long it waits and keeps things."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode

from services.runtime.errors import ConfigurationError
from services.runtime.settings import json_setting, settings_config

_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""The tenant names an event may carry (schemas/envelope.py)."""


class GatewaySettings(BaseSettings):
    model_config = settings_config("GATEWAY_")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65_535)
    api_keys: Annotated[dict[SecretStr, str], NoDecode] = Field(default_factory=dict)
    """Each API key and the tenant it acts for, as JSON: {"<key>": "<tenant>"}. With none, the
    gateway refuses to start. Secrets: no repr, log line or error message shows a key."""
    submission_ttl_s: int = Field(default=7 * 86_400, ge=60)
    """How long the gateway remembers a goal it accepted (what GET /goals/{id} shows as `submitted`
    until the orchestrator has stored the goal's state)."""
    stream_block_ms: int = Field(default=5_000, ge=100, le=60_000)
    """How long one blocking XREAD of a goal's record waits for new events before it asks again."""
    ping_s: float = Field(default=15.0, gt=0)
    """Keep-alive comment sent on an idle event stream, so that proxies do not close it."""
    max_streams: int = Field(default=200, ge=1)
    """Event streams this replica serves at once; each holds a Redis connection while it waits.
    One more is refused with 503."""
    wait_timeout_s: float = Field(default=30.0, gt=0, le=300)
    """With `?wait=true`, how long a lifecycle request waits for the orchestrator's answer."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        return json_setting(value, {}, "GATEWAY_API_KEYS")

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, value: dict[SecretStr, str]) -> dict[SecretStr, str]:
        # The message names the tenant, never the key: the keys are secrets.
        for key, tenant in value.items():
            if not key.get_secret_value().strip():
                raise ValueError(f"an API key of tenant {tenant!r} is empty")
            if not _TENANT.match(tenant):
                raise ValueError(
                    f"tenant {tenant!r} is not a valid tenant name (1 to 64 letters, digits, '_', '.' or '-')"
                )
        return value

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """The settings, or a ConfigurationError naming each bad variable (never its value: the
        API keys are secrets)."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(
                f"GATEWAY_{str(e['loc'][0]).upper() if e['loc'] else ''}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigurationError(f"invalid gateway settings: {problems}") from None
