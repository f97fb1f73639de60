"""Integration fixtures: real Kafka and real Redis from `make test` (compose/local/infra.sh)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from faststream import TestApp
from redis.asyncio import Redis

from services.runtime.host import ServiceSpec, Settings, kafka_app
from services.runtime.offline_model import Script
from services.runtime.settings import KafkaSettings, LLMSettings, PlatformSettings, QdrantSettings, RedisSettings
from tests.support.kafka import drop_namespace_topics, unique

KINDS = ("researcher", "writer")
"""The packaged agent kinds."""
EVERY_SERVICE = [
    ServiceSpec("orchestrator"),
    ServiceSpec("agent", {"kind": "researcher"}),
    ServiceSpec("agent", {"kind": "writer"}),
    ServiceSpec("tools"),
    ServiceSpec("memory"),  # its recorder also writes each goal's record (trace, replay)
]
"""Every role, once each: a whole deployment in the test's process."""


def _require() -> tuple[str, str]:
    kafka, redis = KafkaSettings().bootstrap_servers, RedisSettings().url
    if not kafka or not redis:
        pytest.fail(
            "integration tests need real Kafka and Redis: run them with `make test`, or start "
            "`make infra-up` and export KAFKA_BOOTSTRAP_SERVERS and REDIS_URL"
        )
    return kafka, redis


@pytest.fixture
async def settings(tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings for one test: its own topic namespace (so its own topics and consumer groups),
    whose topics are deleted afterwards: each test makes about a hundred partitions, and a broker
    that keeps them all runs out of file handles over a long run."""
    kafka, redis = _require()
    made = Settings(
        platform=PlatformSettings(namespace=unique("it"), data_dir=tmp_path, partitions=3),
        kafka=KafkaSettings(bootstrap_servers=kafka, session_timeout_ms=6_000, heartbeat_interval_ms=1_000),
        redis=RedisSettings(url=redis),
        qdrant=QdrantSettings(path=":memory:"),
        llm=LLMSettings(),
    )
    yield made
    await drop_namespace_topics(made.kafka, made.platform.namespace)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis.url or "")
    yield client
    await client.aclose()


@asynccontextmanager
async def serving(specs: list[ServiceSpec], settings: Settings, script: Script | None = None) -> AsyncIterator[None]:
    """Run services on the real broker in this process, as `switchboard serve` does."""
    async with TestApp(kafka_app(specs, settings, script)):
        yield
