"""Many handlers in flight share a bounded Redis pool: they wait for a connection, none fails."""

from __future__ import annotations

import asyncio
import dataclasses

from memory.state import Versioned, VersionedStore
from services.runtime.host import Settings, open_runtime
from services.runtime.settings import RedisSettings


class Note(Versioned):
    text: str = ""


async def test_more_concurrent_state_saves_than_connections_all_succeed(settings: Settings) -> None:
    small = dataclasses.replace(settings, redis=RedisSettings(url=settings.redis.url, max_connections=2))
    async with open_runtime(small) as runtime:
        store = VersionedStore(runtime.redis, Note, ttl_s=60)
        keys = [runtime.keys.task_checkpoint("acme", f"t{i}") for i in range(150)]
        saved = await asyncio.gather(*(store.save(key, Note(text=key)) for key in keys))
        assert [s.version for s in saved] == [1] * 150
        loaded = await asyncio.gather(*(store.load(key) for key in keys))
        assert [n.text for n in loaded if n] == keys
