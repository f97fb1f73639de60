"""Redis for tests and benchmarks: deleting what a run left on the shared server."""

from __future__ import annotations

from redis.asyncio import Redis

from memory.keys import RedisKeys
from services.runtime.llm import cache_namespace


async def drop_namespace_keys(redis: Redis, namespace: str) -> None:
    """Every key of the deployment namespace: state, checkpoints, budgets, records, the response cache."""
    for pattern in (RedisKeys(namespace).pattern, f"{cache_namespace(namespace)}:*"):
        stale = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        if stale:
            await redis.delete(*stale)
