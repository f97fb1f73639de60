"""Episodic memory in Redis: the goal timeline and versioned state."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from memory.state import Versioned, VersionedStore
from memory.timeline import GoalTimeline
from services.runtime.errors import ConcurrentUpdate


class Counter(Versioned):
    value: int = 0


async def test_a_goal_timeline_reads_back_in_order_once_per_event_and_expires(redis: Redis, keys: RedisKeys) -> None:
    timeline = GoalTimeline(redis, keys, maxlen=1000, ttl_s=600)
    await timeline.append("acme", "g1", "goal.submitted", "e1", b"{}")
    await timeline.append("acme", "g1", "goal.planned", "e2", b"{}")
    await timeline.append("acme", "g1", "goal.planned", "e2", b"{}")  # a redelivered event
    await timeline.append("globex", "g1", "goal.submitted", "other", b"{}")
    entries = await timeline.read("acme", "g1")
    assert [(e.event_type, e.event_id) for e in entries] == [("goal.submitted", "e1"), ("goal.planned", "e2")]
    assert 0 < await redis.ttl(keys.goal_stream("acme", "g1")) <= 600


async def test_a_stale_writer_cannot_overwrite_newer_state(redis: Redis, keys: RedisKeys) -> None:
    store = VersionedStore(redis, Counter, ttl_s=600)
    key = keys.goal_state("acme", "g1")
    await store.save(key, Counter(value=1))
    mine = await store.load(key)
    theirs = await store.load(key)
    assert mine is not None and theirs is not None
    await store.save(key, theirs.model_copy(update={"value": 2}))
    with pytest.raises(ConcurrentUpdate):
        await store.save(key, mine.model_copy(update={"value": 3}))
    stored = await store.load(key)
    assert stored is not None and (stored.value, stored.version) == (2, 2)
