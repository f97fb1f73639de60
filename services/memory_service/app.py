"""Memory service wiring: answers recalls and the memory tools, kb_search and remember_fact
(signed requests only), on the memory topic; records and curates every goal topic.

Qdrant local mode (a path) allows one process per path, so this service owns it; other services
reach memory through events. Set QDRANT_URL to share a Qdrant server between replicas.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from qdrant_client import AsyncQdrantClient

from memory.embeddings import Embedder, LiteLLMEmbedder, offline_embedder
from memory.semantic import Curation, SemanticMemory
from memory.timeline import GoalTimeline
from schemas.events import MemoryRecallRequested, ToolCallRequested
from services.memory_service import logic
from services.memory_service.settings import MemorySettings
from services.runtime.bus import Subscription, on
from services.runtime.host import Runtime, ServiceApp

SEED = Path(__file__).resolve().parents[2] / "memory" / "seed" / "knowledge.jsonl"


def _qdrant(runtime: Runtime) -> tuple[AsyncQdrantClient, bool]:
    qdrant = runtime.settings.qdrant
    if qdrant.url:
        return AsyncQdrantClient(url=qdrant.url, api_key=qdrant.api_key), False
    path = qdrant.path or str(runtime.settings.platform.data_dir / "qdrant")
    if path == ":memory:":
        return AsyncQdrantClient(location=":memory:"), True
    Path(path).mkdir(parents=True, exist_ok=True)
    return AsyncQdrantClient(path=path), True


def _embedder(runtime: Runtime) -> Embedder:
    llm = runtime.settings.llm
    if llm.embedding_model:
        return LiteLLMEmbedder(llm.embedding_model, llm.embedding_dim)
    return offline_embedder()


async def open_service(runtime: Runtime, **_: Any) -> ServiceApp:
    settings = MemorySettings()
    client, local = _qdrant(runtime)
    embedder = _embedder(runtime)
    curation = Curation.for_embedder(embedder)
    if settings.min_score is not None:
        curation = replace(curation, min_score=settings.min_score)
    if settings.duplicate_threshold is not None:
        curation = replace(curation, duplicate=settings.duplicate_threshold)
    semantic = SemanticMemory(
        client, embedder, runtime.settings.platform.namespace, local, curation, runtime.redis, runtime.keys
    )
    await semantic.ensure_collection()
    seed = settings.seed_file or SEED
    if seed.exists() and settings.seed_tenants:
        await semantic.remember(logic.seed_records(seed, settings.seed_tenants))
    deps = logic.MemoryDeps(
        semantic=semantic,
        timeline=GoalTimeline(runtime.redis, runtime.keys, settings.stream_maxlen, settings.stream_ttl_s),
        redis=runtime.redis,
        keys=runtime.keys,
        audit_topic=runtime.topics.audit,
        catalogue=runtime.catalogue,
        goal_types=runtime.goal_types,
        task_ttl_s=settings.task_ttl_s,
        replay=runtime.replay,
        metrics=runtime.metrics,
        tracing=runtime.tracing,
    )

    topics = runtime.topics
    return ServiceApp(
        [
            Subscription(
                group=runtime.group("memory"),
                topics=(topics.memory,),
                handlers={
                    MemoryRecallRequested: on(partial(logic.recall, deps)),
                    ToolCallRequested: on(partial(logic.execute_tool, deps)),
                },
                require_signature=frozenset({ToolCallRequested}),
            ),
            Subscription(
                group=runtime.group("memory-recorder"), topics=tuple(topics.work_topics()), fallback=on(partial(logic.record, deps)),
                observer=True,
            ),
        ],
        on_close=client.close,
    )
