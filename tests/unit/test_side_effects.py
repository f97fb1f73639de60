"""A side effect runs once per idempotency key, also when Redis blinks at the wrong moment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from memory.keys import RedisKeys
from schemas.tools import SaveNoteArgs
from services.runtime.errors import Retryable
from services.runtime.idempotency import SideEffectGuard
from services.tools import registry


class BlinkingRedis:
    """Redis whose next `failures` writes of a finished result fail, as during a restart."""

    def __init__(self, redis: Redis, failures: int) -> None:
        self._redis = redis
        self.failures = failures

    async def set(self, key: str, value: str, **options: Any) -> Any:
        if '"done"' in value and self.failures:
            self.failures -= 1
            raise RedisConnectionError("Connection closed by server.")
        return await self._redis.set(key, value, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


async def test_the_result_is_recorded_through_a_redis_blip_so_the_effect_is_not_run_again(
    redis: Redis, keys: RedisKeys
) -> None:
    guard = SideEffectGuard(BlinkingRedis(redis, failures=2), keys)  # type: ignore[arg-type]
    runs = 0

    async def effect() -> str:
        nonlocal runs
        runs += 1
        return "written"

    assert await guard.run_once("acme", "d1", effect) == ("written", False)
    assert await guard.run_once("acme", "d1", effect) == ("written", True)
    assert runs == 1


async def test_a_claim_held_elsewhere_is_retried_once_it_has_expired_at_the_latest(redis: Redis, keys: RedisKeys) -> None:
    guard = SideEffectGuard(redis, keys, claim_ttl_s=90)

    async def slow() -> str:
        with pytest.raises(Retryable) as busy:
            await guard.run_once("acme", "d1", slow)
        assert busy.value.retry_after_s is not None and 85 < busy.value.retry_after_s <= 90
        return "done"

    await guard.run_once("acme", "d1", slow)


async def test_save_note_refuses_a_key_it_has_written_already(tmp_path: Path) -> None:
    tool = registry.save_note(tmp_path)
    ctx = registry.CallContext("acme", "g1", "g1.w1", "key-1")
    args = SaveNoteArgs(title="t", body="b")
    await tool.run(args, ctx)
    await tool.run(args, ctx)  # the executor lost its record of the first run
    await tool.run(args, registry.CallContext("acme", "g1", "g1.w1", "key-2"))
    lines = (tmp_path / "acme" / "notes.jsonl").read_text().splitlines()
    assert [json.loads(line)["idempotency_key"] for line in lines] == ["key-1", "key-2"]
