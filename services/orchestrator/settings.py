"""Orchestrator settings (env prefix ORCHESTRATOR_)."""

from pydantic import Field
from pydantic_settings import BaseSettings

from services.runtime.settings import settings_config


class OrchestratorSettings(BaseSettings):
    model_config = settings_config("ORCHESTRATOR_")

    model: str | None = None
    """Model for planning and the final answer; defaults to LLM_DEFAULT_MODEL."""
    max_plan_attempts: int = Field(default=3, ge=1)
    state_ttl_s: int = 7 * 86_400
