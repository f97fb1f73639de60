"""Semantic memory in Qdrant: facts, outcomes and lessons, always read within one tenant.

Local mode (a path) is the embedded default and allows one process per path; a URL switches to
a Qdrant server with the same code.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from memory.embeddings import Embedder

MemoryKind = Literal["fact", "outcome", "lesson"]
_ID_NAMESPACE = uuid.UUID("6f1c2a52-8d0e-4c55-9a39-3f0b1e7a9c11")


@dataclass(frozen=True)
class MemoryRecord:
    tenant: str
    kind: MemoryKind
    text: str
    source: str
    """Stable identity of where it came from (a task id, a seed file line); also its point id."""
    agent: str | None = None
    source_goal: str | None = None
    quality: float = 1.0


@dataclass(frozen=True)
class Recalled:
    memory_id: str
    kind: str
    text: str
    score: float
    source_goal: str | None


class SemanticMemory:
    def __init__(self, client: AsyncQdrantClient, embedder: Embedder, namespace: str, local: bool) -> None:
        self.client = client
        self.embedder = embedder
        self.collection = f"{namespace}-memory-{embedder.name}"
        self.local = local

    async def ensure_collection(self) -> None:
        if await self.client.collection_exists(self.collection):
            return
        try:
            await self.client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=self.embedder.dim, distance=models.Distance.COSINE),
            )
        except UnexpectedResponse as exc:
            if exc.status_code != 409:  # 409: another replica created it first, which is fine
                raise
            return
        if self.local:
            return  # local mode has no payload indexes; it scans, which is fine at its scale
        await self.client.create_payload_index(
            self.collection,
            "tenant",
            field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
        )
        for field in ("kind", "agent", "source_goal"):
            await self.client.create_payload_index(
                self.collection, field, field_schema=models.PayloadSchemaType.KEYWORD
            )

    @staticmethod
    def point_id(tenant: str, source: str) -> str:
        return str(uuid.uuid5(_ID_NAMESPACE, f"{tenant}/{source}"))

    async def remember(self, records: list[MemoryRecord]) -> None:
        """Upsert by source identity, so the same outcome written twice stays one memory."""
        if not records:
            return
        vectors = await self.embedder.embed([r.text for r in records])
        points = [
            models.PointStruct(
                id=self.point_id(r.tenant, r.source),
                vector=vector,
                payload={
                    "tenant": r.tenant,
                    "kind": r.kind,
                    "text": r.text,
                    "agent": r.agent,
                    "source": r.source,
                    "source_goal": r.source_goal,
                    "quality": r.quality,
                },
            )
            for r, vector in zip(records, vectors, strict=True)
        ]
        await self.client.upsert(self.collection, points=points)

    async def recall(
        self,
        tenant: str,
        query: str,
        k: int,
        kinds: tuple[MemoryKind, ...] | None = None,
        min_score: float = 0.0,
    ) -> list[Recalled]:
        """The k most relevant memories of `tenant`. The tenant filter is not optional."""
        must: list[Any] = [models.FieldCondition(key="tenant", match=models.MatchValue(value=tenant))]
        if kinds:
            must.append(models.FieldCondition(key="kind", match=models.MatchAny(any=list(kinds))))
        [vector] = await self.embedder.embed([query])
        result = await self.client.query_points(
            self.collection,
            query=vector,
            query_filter=models.Filter(must=must),
            limit=k,
            score_threshold=min_score,
            with_payload=True,
        )
        return [
            Recalled(
                memory_id=str(p.id),
                kind=str((p.payload or {}).get("kind")),
                text=str((p.payload or {}).get("text")),
                score=p.score,
                source_goal=(p.payload or {}).get("source_goal"),
            )
            for p in result.points
        ]
