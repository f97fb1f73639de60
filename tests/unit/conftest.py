"""Unit-test fixtures: in-process stores and the offline model; no servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.topics import Topics


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


@pytest.fixture
def topics() -> Topics:
    return Topics("unit", ("researcher", "writer"))


@pytest.fixture
def keys() -> RedisKeys:
    return RedisKeys("unit")
