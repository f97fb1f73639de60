"""Tenant isolation: a goal of one tenant can never read another tenant's memories or checkpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from qdrant_client import AsyncQdrantClient
from redis.asyncio import Redis

from memory.embeddings import HashingEmbedder
from memory.keys import RedisKeys
from memory.semantic import MemoryRecord, SemanticMemory
from schemas.events import ToolCallCompleted
from schemas.topics import Topics
from services.agents import logic
from services.runtime.offline_model import ToolCall, Turn
from tests.unit.test_agent_step import assignment, make_deps


@pytest.fixture
async def memory() -> AsyncIterator[SemanticMemory]:
    client = AsyncQdrantClient(location=":memory:")
    store = SemanticMemory(client, HashingEmbedder(), "unit", local=True)
    await store.ensure_collection()
    yield store
    await client.close()


async def test_recall_returns_only_the_asking_tenants_memories_however_close_the_others_are(
    memory: SemanticMemory,
) -> None:
    secret = "The acme launch code is 4242 and the vault is in Zurich"
    await memory.remember([
        MemoryRecord(tenant="acme", kind="fact", text=secret, source="acme-1"),
        MemoryRecord(tenant="globex", kind="fact", text="Globex ships widgets on Mondays", source="globex-1"),
    ])
    # The exact text of acme's memory, asked by globex: nothing of acme's comes back.
    hits = await memory.recall("globex", secret, k=10)
    assert {h.text for h in hits} <= {"Globex ships widgets on Mondays"}
    assert [h.text for h in await memory.recall("acme", secret, k=10)][0] == secret


async def test_the_same_source_in_two_tenants_is_two_memories(memory: SemanticMemory) -> None:
    await memory.remember([
        MemoryRecord(tenant="acme", kind="fact", text="acme's own note", source="shared-id"),
        MemoryRecord(tenant="globex", kind="fact", text="globex's own note", source="shared-id"),
    ])
    assert [h.text for h in await memory.recall("acme", "own note", k=5)] == ["acme's own note"]
    assert [h.text for h in await memory.recall("globex", "own note", k=5)] == ["globex's own note"]


def test_every_key_of_a_tenant_is_under_that_tenants_prefix() -> None:
    keys = RedisKeys("sb")
    for key in (
        keys.goal_state("acme", "g1"), keys.goal_stream("acme", "g1"), keys.task_checkpoint("acme", "g1.r1"),
        keys.idempotency("acme", "abc"), keys.goal_budget("acme", "g1"), keys.tenant_cost("acme", "20261121"),
    ):
        assert key.startswith("sb:sb:t:acme:")


async def test_an_event_naming_another_tenant_cannot_reach_a_tasks_checkpoint(
    redis: Redis, keys: RedisKeys, topics: Topics
) -> None:
    def script(messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        return Turn(tool_calls=[ToolCall("calculator", {"expression": "6*7"})])

    deps = make_deps(redis, keys, topics, script=script, recall_k=0)
    outputs = await logic.start_task(deps, assignment())  # acme's task g1.r1, now waiting for its tool
    [request] = [o.event for o in outputs if o.event.event_type == "tool.requested"]
    # The same task id and call id, from another tenant: it lands in globex's key space, where
    # there is no such task, so acme's checkpoint is neither read nor changed.
    forged = ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool="calculator", ok=True, output="6*7 = 0"
    ).model_copy(update={"tenant": "globex"})
    before = await redis.get(keys.task_checkpoint("acme", "g1.r1"))
    assert await logic.resume_with_tool_result(deps, forged) == []
    assert await redis.get(keys.task_checkpoint("acme", "g1.r1")) == before
    assert await redis.exists(keys.task_checkpoint("globex", "g1.r1")) == 0
    assert before is not None and deps.llm.offline.calls == 1
    real = forged.model_copy(update={"tenant": "acme", "output": "6*7 = 42"})
    await logic.resume_with_tool_result(deps, real)
    assert deps.llm.offline.calls == 2  # acme's task went on with its own result
