"""Memory service settings (env prefix MEMORY_)."""

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode

from services.runtime.settings import settings_config


class MemorySettings(BaseSettings):
    model_config = settings_config("MEMORY_")

    stream_maxlen: int = Field(default=10_000, ge=100)
    stream_ttl_s: int = Field(default=7 * 86_400, ge=60)
    min_score: float | None = Field(default=None, ge=-1.0, le=1.0)
    """Relevance threshold (cosine similarity) below which a memory is not recalled; unset: the
    embedder's default (memory.semantic.Curation.for_embedder)."""
    duplicate_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Similarity at which a write merges into an existing memory that names the same things;
    unset: the embedder's default."""
    task_ttl_s: int = Field(default=7 * 86_400, ge=60)
    """How long a task's instruction and the memories it was served are kept, to curate its outcome."""
    seed_file: Path | None = None
    """JSON lines of {id, text} facts loaded into the knowledge base at start-up; defaults to memory/seed/knowledge.jsonl."""
    seed_tenants: Annotated[tuple[str, ...], NoDecode] = ("default",)

    @field_validator("seed_tenants", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value
