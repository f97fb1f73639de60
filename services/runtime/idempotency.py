"""Make redelivery harmless.

`StepLedger` applies each input event to a versioned state at most once and keeps the outputs of
the last applied event, so a redelivered event re-produces exactly the outputs it produced before
(downstream dedupes them by id) without calling the model again.

`SideEffectGuard` runs a side-effecting tool at most once per idempotency key (Redis SET NX);
a duplicate request gets the stored result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from memory.keys import RedisKeys
from memory.state import Versioned, VersionedStore
from schemas.events import Event
from services.runtime.bus import Outgoing
from services.runtime.errors import Retryable

APPLIED_KEPT = 64


class StoredOutgoing(BaseModel):
    topic: str
    key: str
    event: Event

    @classmethod
    def of(cls, out: Outgoing) -> StoredOutgoing:
        return cls(topic=out.topic, key=out.key, event=out.event)

    def restore(self) -> Outgoing:
        return Outgoing(self.topic, self.event, self.key)


class Ledgered(Versioned):
    """State that remembers which input events it has applied, and the last one's outputs."""

    applied: list[str] = Field(default_factory=list)
    outbox: list[StoredOutgoing] = Field(default_factory=list)

    def replay(self, event_id: str) -> list[Outgoing] | None:
        """Outputs to re-produce if `event_id` was applied already, else None."""
        if event_id not in self.applied:
            return None
        if self.applied[-1] == event_id:
            return [o.restore() for o in self.outbox]
        return []  # an older event: a later one has been applied, so its outputs went out

    def record(self, event_id: str, outputs: list[Outgoing]) -> None:
        self.applied = (self.applied + [event_id])[-APPLIED_KEPT:]
        self.outbox = [StoredOutgoing.of(o) for o in outputs]


L = TypeVar("L", bound=Ledgered)


class StepLedger(Generic[L]):
    def __init__(self, store: VersionedStore[L]) -> None:
        self.store = store

    async def apply(
        self,
        key: str,
        event_id: str,
        step: Callable[[L | None], Awaitable[tuple[L | None, list[Outgoing]]]],
    ) -> list[Outgoing]:
        """Run `step` on the current state unless `event_id` was applied; save, then return outputs.

        `step` returns the new state (None: nothing to save) and the outputs. It may change the
        state it is given in place: that object was loaded for this call alone. The state is
        saved before the outputs are produced, so a crash in between is repaired by `replay`.
        """
        state = await self.store.load(key)
        if state is not None:
            replayed = state.replay(event_id)
            if replayed is not None:
                return replayed
        new_state, outputs = await step(state)
        if new_state is None:
            return outputs
        new_state.record(event_id, outputs)
        await self.store.save(key, new_state)
        return outputs


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def idempotency_digest(goal_id: str, task_id: str | None, step_id: str, tool: str, args: dict[str, Any]) -> str:
    material = canonical_json([goal_id, task_id, step_id, tool, args])
    return hashlib.sha256(material.encode()).hexdigest()


class SideEffectGuard:
    def __init__(self, redis: Redis, keys: RedisKeys, claim_ttl_s: int = 60, result_ttl_s: int = 7 * 86_400) -> None:
        self.redis = redis
        self.keys = keys
        self.claim_ttl_s = claim_ttl_s
        self.result_ttl_s = result_ttl_s

    async def run_once(
        self, tenant: str, digest: str, action: Callable[[], Awaitable[str]]
    ) -> tuple[str, bool]:
        """Returns (result, replayed). Raises Retryable while another executor holds the claim."""
        key = self.keys.idempotency(tenant, digest)
        claimed = await self.redis.set(key, json.dumps({"state": "running"}), nx=True, ex=self.claim_ttl_s)
        if not claimed:
            raw = await self.redis.get(key)
            stored = json.loads(raw) if raw else {}
            if stored.get("state") == "done":
                return str(stored["result"]), True
            # The claim is someone else's, or an executor's that died (or lost Redis) before it
            # could record the result: try again once it has expired at the latest.
            expires_ms = await self.redis.pttl(key)
            raise Retryable(
                f"side effect {digest[:12]} is being run by another executor",
                retry_after_s=expires_ms / 1000 if expires_ms > 0 else None,
            )
        try:
            result = await action()
        except BaseException:
            await self.redis.delete(key)  # it did not complete: let a retry run it
            raise
        # The side effect happened: record it through a Redis blip rather than run it again.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
            stop=stop_after_delay(self.claim_ttl_s),
            reraise=True,
        ):
            with attempt:
                await self.redis.set(key, json.dumps({"state": "done", "result": result}), ex=self.result_ttl_s)
        return result, False
