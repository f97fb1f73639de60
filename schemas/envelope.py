"""The envelope every event carries, and decoding bytes from the wire into a typed event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields shared by every event. `event_type` is the discriminator on the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    event_type: str
    schema_version: int = SCHEMA_VERSION
    ts: datetime = Field(default_factory=utcnow)
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    goal_id: str = Field(min_length=1, max_length=128)
    task_id: str | None = Field(default=None, max_length=256)
    causation_id: str | None = Field(default=None, max_length=128)

    def caused(self, **fields: Any) -> dict[str, Any]:
        """Fields for an event caused by this one: same tenant and goal, causation set."""
        base: dict[str, Any] = {
            "tenant": self.tenant,
            "goal_id": self.goal_id,
            "task_id": self.task_id,
            "causation_id": self.event_id,
        }
        base.update(fields)
        return base

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
