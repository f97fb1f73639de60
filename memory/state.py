"""Versioned JSON documents in Redis with compare-and-set saves.

Goal state and task checkpoints live here. Two replicas may briefly handle the same key during
a rebalance; the version check makes the slower one reload instead of overwriting.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import WatchError

from services.runtime.errors import ConcurrentUpdate

T = TypeVar("T", bound=BaseModel)


class Versioned(BaseModel):
    version: int = 0


V = TypeVar("V", bound=Versioned)


class VersionedStore(Generic[V]):
    def __init__(self, redis: Redis, model: type[V], ttl_s: int) -> None:
        self.redis = redis
        self.model = model
        self.ttl_s = ttl_s

    async def load(self, key: str) -> V | None:
        raw = await self.redis.get(key)
        return None if raw is None else self.model.model_validate_json(raw)

    async def save(self, key: str, value: V) -> V:
        """Store `value` if the stored version is still the one it was loaded at.

        Returns the stored document with its version incremented. Raises ConcurrentUpdate
        (retryable) when another writer got there first.
        """
        expected = value.version
        updated = value.model_copy(update={"version": expected + 1})
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                current = 0 if raw is None else self.model.model_validate_json(raw).version
                if current != expected:
                    raise ConcurrentUpdate(f"{key} is at version {current}, expected {expected}")
                pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                pipe.set(key, updated.model_dump_json(), ex=self.ttl_s)
                await pipe.execute()
            except WatchError as exc:
                raise ConcurrentUpdate(f"{key} changed while saving") from exc
        return updated
