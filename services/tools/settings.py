"""Tool executor settings (env prefix TOOLS_)."""

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode

from services.runtime.settings import settings_config


class ToolsSettings(BaseSettings):
    model_config = settings_config("TOOLS_")

    timeout_s: float = Field(default=10.0, gt=0)
    sandbox_dir: Path | None = None
    """Where save_note writes; defaults to <SWITCHBOARD_DATA_DIR>/sandbox."""
    http_enabled: bool = False
    http_allowed_hosts: Annotated[frozenset[str], NoDecode] = frozenset()
    """Comma-separated host names http_get may fetch from."""
    http_max_bytes: int = 200_000

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(h.strip().lower() for h in value.split(",") if h.strip())
        return value
