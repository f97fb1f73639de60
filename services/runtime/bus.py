"""What a transport hands the pipeline (Delivery) and what a handler hands back (Outgoing)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.envelope import Envelope


@dataclass(frozen=True)
class Delivery:
    """One consumed message, as it came off the topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Mapping[str, str]
    timestamp_ms: int
    group: str


@dataclass(frozen=True)
class Outgoing:
    """An event a handler wants produced, before its input is committed."""

    topic: str
    event: Envelope
    key: str


Handler = Callable[[Envelope, Delivery], Awaitable[list[Outgoing]]]


def on(step: Callable[[Any], Awaitable[list[Outgoing]]]) -> Handler:
    """Adapt a logic function of one event to a Handler.

    The subscription maps each event type to its handler, so `step` only ever sees its type.
    """

    async def handler(event: Envelope, _: Delivery) -> list[Outgoing]:
        return await step(event)

    return handler


@dataclass(frozen=True)
class Subscription:
    """A consumer group's interest: topics, and the handler for each event type."""

    group: str
    topics: tuple[str, ...]
    handlers: Mapping[type[Envelope], Handler] = field(default_factory=dict)
    fallback: Handler | None = None
    """Handles every event type not in `handlers` (observers such as the recorder)."""
    observer: bool = False
    """Reads topics another group owns. It skips messages it cannot decode instead of
    dead-lettering them: the owning group writes the one dead-letter record for each."""
    require_signature: frozenset[type[Envelope]] = frozenset()
    """Event types refused (dead-lettered as `tool_denied`, and audited) before their handler runs
    unless their `x-signature` header verifies: requests that must come from a platform service."""
    agent: str | None = None
    """The agent kind whose inbox this group reads: each handler call is an `invoke_agent` span."""

    def handler_for(self, event: Envelope) -> Handler | None:
        return self.handlers.get(type(event), self.fallback)


class Producer(Protocol):
    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None: ...
