"""A goal's episodic record: one Redis stream per goal, in order, bounded and expiring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

from memory.keys import RedisKeys


@dataclass(frozen=True)
class TimelineEntry:
    entry_id: str
    event_type: str
    event_id: str
    payload: bytes


class GoalTimeline:
    def __init__(self, redis: Redis, keys: RedisKeys, maxlen: int, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self.ttl_s = ttl_s

    async def append(
        self, tenant: str, goal_id: str, event_type: str, event_id: str, payload: bytes
    ) -> None:
        key = self.keys.goal_stream(tenant, goal_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                key,
                {"event_type": event_type, "event_id": event_id, "payload": payload},
                maxlen=self.maxlen,
                approximate=True,
            )
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def read(self, tenant: str, goal_id: str) -> list[TimelineEntry]:
        """The goal's events in order, once each (redelivered duplicates are dropped)."""
        # redis-py types stream rows loosely; with decode_responses off they are bytes.
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrange(self.keys.goal_stream(tenant, goal_id)))
        seen: set[str] = set()
        entries: list[TimelineEntry] = []
        for entry_id, fields in rows:
            event_id = _text(fields[b"event_id"])
            if event_id in seen:
                continue
            seen.add(event_id)
            entries.append(
                TimelineEntry(_text(entry_id), _text(fields[b"event_type"]), event_id, fields[b"payload"])
            )
        return entries


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
