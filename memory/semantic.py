"""Semantic memory in Qdrant: curated facts, outcomes and lessons, always read within one tenant.

Writes are curated, by rules and thresholds, never by a model:
- **Near-duplicates merge.** A write whose nearest memory of the same kind is at least
  `Curation.duplicate` similar and names the same things (numbers, identifiers, names:
  `names_agree`) updates that memory (seen count, quality, provenance) instead of adding one.
- **Facts have versions.** A fact written with a subject is the current version of that subject
  until a fact with the same normalised subject and a later `valid_from` supersedes it. The old
  version stays, marked superseded and linked to its successor. Which version is current depends
  only on `valid_from` (then the source, to break ties), not on the order writes arrive in. A
  same-subject write merges only if it gives the same value (`same_value`): a changed value
  must never be merged away. A fact under a new subject that restates another subject's current
  fact in the same words merges into it, and the new subject becomes an alias of that fact.
- **Echoes are dropped.** A write that repeats a memory served to the same task (`served`) is
  not stored again: recalled memories never come back as new ones.
- **Failures are lessons.** A lesson carries its cause and a label, so it is served as a mistake
  not to repeat, never as an example.
- **Related memories are linked** on write, both ways.

Reads always filter by tenant (no parameter turns that off), drop matches under the relevance
threshold, map a superseded version to its current one, and rank by similarity weighed with
quality and recency.

Local mode (a path) is the embedded default and allows one process per path; a URL switches to
a Qdrant server with the same code. One collection per embedding model.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse
from redis.asyncio import Redis

from memory.embeddings import Embedder
from memory.keys import RedisKeys

MemoryKind = Literal["fact", "outcome", "lesson"]
WriteAction = Literal["added", "merged", "superseded", "outdated", "echo"]
_ID_NAMESPACE = uuid.UUID("6f1c2a52-8d0e-4c55-9a39-3f0b1e7a9c11")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
_FUNCTION_WORDS = frozenset(
    "a an the on in at for to of from by with and or but if when while after before since as is are was were "
    "it its this that these those there here we our you your they their he she his her i my all any each every "
    "no not now then today yesterday also still only".split()
)
_MAX_SOURCES = 20
_MAX_LINKS = 10
_DAY_S = 86_400.0


@dataclass(frozen=True)
class Curation:
    """Thresholds are cosine similarities; each embedder has its own scale (see `for_embedder`).

    `make bench-memory` measures what they give: duplicates merged, leaks, recall.
    """

    duplicate: float = 0.75
    """At or above: the same memory said again (merged), if it names the same things."""
    echo: float = 0.8
    """At or above, against a memory served to the same task: an echo, not stored."""
    link: float = 0.55
    """At or above (and not a duplicate): related, linked both ways."""
    min_score: float = 0.35
    """Relevance threshold for reads."""
    quality_weight: float = 0.2
    """How much quality (0..1) weighs in the rank: a quality-0 memory loses this share of its score."""
    recency_weight: float = 0.1
    half_life_days: float = 30.0

    @classmethod
    def for_embedder(cls, embedder: Embedder) -> Curation:
        if embedder.name.startswith("hashing"):
            # Shared words only: paraphrases score far lower than with a real embedder.
            return cls(duplicate=0.6, echo=0.6, link=0.3, min_score=0.2)
        return cls()


@dataclass(frozen=True)
class MemoryRecord:
    tenant: str
    kind: MemoryKind
    text: str
    source: str
    """Stable identity of where it came from (a task id, a tool call, a seed line): writing the
    same source again changes nothing."""
    agent: str | None = None
    source_goal: str | None = None
    quality: float = 0.7
    subject: str | None = None
    """Facts: what the fact is about. The same subject (case, spacing and punctuation aside)
    means a newer version of the same fact."""
    valid_from: float | None = None
    """When it became true (epoch seconds; the event's time). Defaults to now."""
    cause: str | None = None
    """Lessons: why the work failed (the dead-letter or failure reason)."""


@dataclass(frozen=True)
class WriteResult:
    action: WriteAction
    memory_id: str
    """The memory that holds it now (for `echo`, the memory it repeated)."""


@dataclass(frozen=True)
class Recalled:
    memory_id: str
    kind: str
    text: str
    score: float
    """The rank: similarity weighed with quality and recency."""
    similarity: float
    source_goal: str | None
    label: str | None
    version: int
    quality: float
    tenant: str
    subject: str | None
    source: str


@dataclass
class _Point:
    id: str
    payload: dict[str, Any]
    similarity: float = 0.0
    vector: list[float] = field(default_factory=list)


def normalize_subject(text: str) -> str:
    """A subject (or a text) with case, spacing and punctuation aside: what two spellings share."""
    return " ".join(re.findall(r"[a-z0-9]+", text.casefold()))


def _tokens(text: str) -> list[str]:
    return [w.strip(".:,/-") for w in _WORD.findall(text) if w.strip(".:,/-")]


def _named(text: str) -> frozenset[str]:
    """What a statement names: numbers and identifiers (tokens with digits, hyphens or
    underscores) and capitalised words that do not start a sentence (`Root cause: ...` names
    nothing; `owned by Alice` names Alice)."""
    named: set[str] = set()
    for match in _WORD.finditer(text):
        word = match.group(0).strip(".:,/-")
        if not word:
            continue
        before = text[: match.start()].rstrip()
        starts_sentence = not before or before[-1] in ".:;!?()[]\n"
        if any(c.isdigit() or c in "-_" for c in word) or (
            word[:1].isupper() and not starts_sentence and word.casefold() not in _FUNCTION_WORDS
        ):
            named.add(word.casefold())
    return frozenset(named)


def _stems(text: str) -> frozenset[str]:
    """Content words cut to four letters, so `listens`/`listening` agree and `payments`/`sre` differ."""
    return frozenset(w.casefold()[:4] for w in _tokens(text) if w.casefold() not in _FUNCTION_WORDS)


def names_agree(a: str, b: str) -> bool:
    """Each text mentions everything the other names. Two texts can be close in embedding space
    and still disagree (`port 8080` / `port 9090`, `owned by Alice` / `owned by Bob`); they are
    duplicates only if nothing one names is missing from the other."""
    words_a = {w.casefold() for w in _tokens(a)}
    words_b = {w.casefold() for w in _tokens(b)}
    return _named(a) <= words_b and _named(b) <= words_a


def same_statement(a: str, b: str) -> bool:
    """The same named things and the same content words (by stem), in any order."""
    return names_agree(a, b) and _stems(a) == _stems(b)


def same_value(a: str, b: str, subject: str) -> bool:
    """For two statements of one subject: do they give the same value?

    Yes if, apart from the subject's own words, they name the same numbers, identifiers and
    names (`port 8080`, `eu-west-1`, `the Falcon bucket`), however they are worded; a name in
    one wording only (`TCP port 8080`) makes a new version, which is safe. If they name nothing
    beyond the subject (`the payments team owns it` / `the sre team owns it`), only the same
    content words (by stem) count as the same value; a paraphrase in other words then becomes a
    new version, which is safe: it states the same. A value that differs only in a plain word
    while every named thing matches is merged: the known limit of deciding by rules.
    """
    own = {w.casefold() for w in _tokens(subject)}
    values_a, values_b = _named(a) - own, _named(b) - own
    if values_a or values_b:
        return values_a == values_b
    return same_statement(a, b)


def lesson_label(cause: str | None) -> str:
    return f"FAILED ({cause or 'unknown cause'}): do not repeat"


class SemanticMemory:
    def __init__(
        self,
        client: AsyncQdrantClient,
        embedder: Embedder,
        namespace: str,
        local: bool,
        curation: Curation | None = None,
        redis: Redis | None = None,
        keys: RedisKeys | None = None,
    ) -> None:
        self.client = client
        self.embedder = embedder
        self.collection = f"{namespace}-memory-{embedder.name}"
        self.local = local
        self.curation = curation or Curation.for_embedder(embedder)
        self.redis = redis
        self.keys = keys or RedisKeys(namespace)
        self._local_locks: dict[str, asyncio.Lock] = {}

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
            return  # local mode ignores payload indexes; it scans, which is fine at its scale
        await self.client.create_payload_index(
            self.collection,
            "tenant",
            field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
        )
        for name in ("kind", "agent", "source_goal", "subject"):
            await self.client.create_payload_index(self.collection, name, field_schema=models.PayloadSchemaType.KEYWORD)
        await self.client.create_payload_index(self.collection, "current", field_schema=models.PayloadSchemaType.BOOL)

    @staticmethod
    def point_id(tenant: str, source: str) -> str:
        return str(uuid.uuid5(_ID_NAMESPACE, f"{tenant}/{source}"))

    @asynccontextmanager
    async def _writing(self, tenant: str) -> AsyncIterator[None]:
        """One curated write per tenant at a time, across replicas when Redis is there: a write
        reads its neighbours, then decides; two at once could both add the same fact."""
        if self.redis is None:
            async with self._local_locks.setdefault(tenant, asyncio.Lock()):
                yield
            return
        async with self.redis.lock(self.keys.memory_write_lock(tenant), timeout=30, blocking_timeout=30):
            yield

    async def remember(self, records: list[MemoryRecord]) -> list[WriteResult]:
        """Each record written, curated; their distinct texts embedded in one batch (a seed file
        holds the same lines for every tenant)."""
        texts = list(dict.fromkeys(r.text for r in records))
        vectors = dict(zip(texts, await self.embedder.embed(texts), strict=True)) if texts else {}
        return [await self.write(r, vector=vectors[r.text]) for r in records]

    async def write(
        self, record: MemoryRecord, served: frozenset[str] = frozenset(), vector: list[float] | None = None,
    ) -> WriteResult:
        """Store `record`, curated (see the module docstring). `served`: ids of the memories the
        writing task was shown; a write that repeats one of them is an echo and is not stored.
        `vector`: the record's embedding, when the caller has it already."""
        record = replace(record, valid_from=record.valid_from or time.time())
        if vector is None:
            [vector] = await self.embedder.embed([record.text])
        async with self._writing(record.tenant):
            near = await self._neighbours(record.tenant, vector)
            echo = next((p for p in near if p.id in served and p.similarity >= self.curation.echo), None)
            if echo is not None:
                return WriteResult("echo", echo.id)
            if record.kind == "fact" and record.subject and normalize_subject(record.subject):
                return await self._write_version(record, vector, near)
            own_id = self.point_id(record.tenant, record.source)
            for point in near:
                if point.id == own_id or record.source in point.payload.get("sources", []):
                    return WriteResult("merged", point.id)  # the same write again: nothing changes
            twin = next((p for p in near if self._is_duplicate(record, p)), None)
            if twin is not None:
                await self._merge(twin, record)
                return WriteResult("merged", twin.id)
            await self._add(own_id, record, vector, near, version=1, subject=None)
            return WriteResult("added", own_id)

    async def _write_version(self, record: MemoryRecord, vector: list[float], near: list[_Point]) -> WriteResult:
        subject = normalize_subject(record.subject or "")
        head_id = self.point_id(record.tenant, f"subject:{subject}")
        head = await self._get(head_id)
        if head is not None and head.payload.get("alias_of"):
            # This subject was first written as another subject's fact, word for word: one fact.
            head_id = str(head.payload["alias_of"])
            head = await self._get(head_id)
            subject = str(head.payload.get("subject")) if head is not None else subject
        if head is None:
            twin = next((p for p in near if self._restates(record, p)), None)
            if twin is not None:
                await self._merge(twin, record)
                await self._add(
                    head_id, record, vector, [], version=0, subject=subject, current=False,
                    superseded_by=twin.id, alias_of=twin.id,
                )
                return WriteResult("merged", twin.id)
            await self._add(head_id, record, vector, near, version=1, subject=subject)
            return WriteResult("added", head_id)
        if record.source in head.payload.get("sources", []):
            return WriteResult("merged", head_id)  # the same write again
        if self._is_duplicate(record, head):
            await self._merge(head, record)
            return WriteResult("merged", head_id)
        archive_id = self.point_id(record.tenant, f"subject:{subject}:source:{record.source}")
        if (record.valid_from or 0.0, record.source) < (head.payload["valid_from"], head.payload["source"]):
            # Older than the current version (it arrived late): kept as history, never current.
            await self._add(
                archive_id, record, vector, [], version=0, subject=subject, current=False, superseded_by=head_id
            )
            return WriteResult("outdated", head_id)
        old_id = self.point_id(record.tenant, f"subject:{subject}:source:{head.payload['source']}")
        old = {**head.payload, "current": False, "superseded_by": head_id}
        await self.client.upsert(self.collection, points=[models.PointStruct(id=old_id, vector=head.vector, payload=old)])
        await self._add(
            head_id, record, vector, [p for p in near if p.id != head_id], version=int(head.payload["version"]) + 1,
            subject=subject, supersedes=old_id,
        )
        return WriteResult("superseded", head_id)

    def _restates(self, record: MemoryRecord, point: _Point) -> bool:
        """A fact under a new subject that says what another subject's current fact says, in the
        same content words: the new subject becomes an alias of that fact. Only this strict:
        `port 8080 for billing-api` and `health check port 8080 for billing-api` are two facts."""
        payload = point.payload
        return (
            payload.get("kind") == "fact"
            and bool(payload.get("subject"))
            and point.similarity >= self.curation.duplicate
            and same_statement(str(payload.get("text", "")), record.text)
        )

    def _is_duplicate(self, record: MemoryRecord, point: _Point) -> bool:
        payload = point.payload
        if payload.get("kind") != record.kind:
            return False
        if record.kind == "fact" and payload.get("subject") and not record.subject:
            return False  # a versioned fact only takes writes for its own subject
        text = str(payload.get("text", ""))
        if normalize_subject(text) == normalize_subject(record.text):
            return True
        if record.subject:
            # The same subject already ties them to one fact; only the value decides.
            return same_value(text, record.text, record.subject)
        return point.similarity >= self.curation.duplicate and names_agree(text, record.text)

    async def _neighbours(self, tenant: str, vector: list[float]) -> list[_Point]:
        """The tenant's current memories close enough to be related, best first."""
        result = await self.client.query_points(
            self.collection,
            query=vector,
            # must_not rather than must: memories written before versions existed have no `current`.
            query_filter=models.Filter(must=[_match("tenant", tenant)], must_not=[_match("current", False)]),
            limit=10,
            score_threshold=self.curation.link,
            with_payload=True,
        )
        return [_Point(str(p.id), dict(p.payload or {}), p.score) for p in result.points]

    async def _get(self, point_id: str) -> _Point | None:
        found = await self.client.retrieve(self.collection, [point_id], with_payload=True, with_vectors=True)
        if not found:
            return None
        vector = found[0].vector  # one unnamed dense vector per point in this collection
        dense = [x for x in vector if isinstance(x, float)] if isinstance(vector, list) else []
        return _Point(point_id, dict(found[0].payload or {}), vector=dense)

    async def _merge(self, point: _Point, record: MemoryRecord) -> None:
        payload = point.payload
        sources = [*payload.get("sources", []), record.source][-_MAX_SOURCES:]
        update = {
            "seen": int(payload.get("seen", 1)) + 1,
            "quality": round(min(1.0, float(payload.get("quality", 0.5)) + 0.1), 4),
            "sources": sources,
            "last_seen": max(float(payload.get("last_seen", 0.0)), record.valid_from or 0.0),
        }
        await self.client.set_payload(self.collection, payload=update, points=[point.id])

    async def _add(
        self,
        point_id: str,
        record: MemoryRecord,
        vector: list[float],
        near: list[_Point],
        *,
        version: int,
        subject: str | None,
        current: bool = True,
        superseded_by: str | None = None,
        supersedes: str | None = None,
        alias_of: str | None = None,
    ) -> None:
        links = [p.id for p in near if p.id != point_id][:3]
        payload: dict[str, Any] = {
            "tenant": record.tenant,
            "kind": record.kind,
            "text": record.text,
            "agent": record.agent,
            "source": record.source,
            "sources": [record.source],
            "source_goal": record.source_goal,
            "quality": record.quality,
            "seen": 1,
            "version": version,
            "valid_from": record.valid_from,
            "last_seen": record.valid_from,
            "current": current,
            "subject": subject,
            "superseded_by": superseded_by,
            "supersedes": supersedes,
            "alias_of": alias_of,
            "links": links,
            "cause": record.cause,
            "label": lesson_label(record.cause) if record.kind == "lesson" else None,
        }
        await self.client.upsert(self.collection, points=[models.PointStruct(id=point_id, vector=vector, payload=payload)])
        for linked in near:
            if linked.id in links and point_id not in linked.payload.get("links", []):
                back = [*linked.payload.get("links", []), point_id][-_MAX_LINKS:]
                await self.client.set_payload(self.collection, payload={"links": back}, points=[linked.id])

    async def load_raw(self, records: list[MemoryRecord]) -> None:
        """Upsert without curation, as current memories keyed by source (bulk loads, benchmarks)."""
        if not records:
            return
        vectors = await self.embedder.embed([r.text for r in records])
        now = time.time()
        points = [
            models.PointStruct(
                id=self.point_id(r.tenant, r.source),
                vector=vector,
                payload={
                    "tenant": r.tenant, "kind": r.kind, "text": r.text, "agent": r.agent, "source": r.source,
                    "sources": [r.source], "source_goal": r.source_goal, "quality": r.quality, "seen": 1,
                    "version": 1, "valid_from": r.valid_from or now, "last_seen": r.valid_from or now,
                    "current": True, "subject": None, "superseded_by": None, "supersedes": None, "links": [],
                    "cause": r.cause, "label": lesson_label(r.cause) if r.kind == "lesson" else None,
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
        min_score: float | None = None,
    ) -> list[Recalled]:
        """The k best memories of `tenant` for `query`. The tenant filter is not optional.

        A match on a superseded version serves its current version instead, so an old phrasing of
        a fact still finds the fact as it is now.
        """
        threshold = self.curation.min_score if min_score is None else min_score
        must: list[Any] = [_match("tenant", tenant)]
        if kinds:
            must.append(models.FieldCondition(key="kind", match=models.MatchAny(any=list(kinds))))
        [vector] = await self.embedder.embed([query])
        result = await self.client.query_points(
            self.collection,
            query=vector,
            query_filter=models.Filter(must=must),
            limit=max(4 * k, 20),
            score_threshold=threshold,
            with_payload=True,
        )
        best: dict[str, _Point] = {}
        heads_wanted: dict[str, float] = {}
        for p in result.points:
            payload = dict(p.payload or {})
            if payload.get("tenant") != tenant:
                continue  # never happens with the filter; checked again because a leak is the worst bug
            if payload.get("current", True):
                _keep(best, _Point(str(p.id), payload, p.score))
            elif payload.get("superseded_by"):
                head = str(payload["superseded_by"])
                heads_wanted[head] = max(heads_wanted.get(head, 0.0), p.score)
        missing = [h for h in heads_wanted if h not in best]
        if missing:
            for found in await self.client.retrieve(self.collection, missing, with_payload=True):
                payload = dict(found.payload or {})
                if payload.get("tenant") == tenant and payload.get("current", True):
                    _keep(best, _Point(str(found.id), payload, heads_wanted[str(found.id)]))
        for head, similarity in heads_wanted.items():
            if head in best and best[head].similarity < similarity:
                best[head].similarity = similarity
        now = time.time()
        ranked = sorted(
            (self._recalled(p, now) for p in best.values()), key=lambda r: (-r.score, r.memory_id)
        )
        return ranked[:k]

    def _recalled(self, point: _Point, now: float) -> Recalled:
        payload, cur = point.payload, self.curation
        quality = float(payload.get("quality", 0.5))
        age_days = max(0.0, now - float(payload.get("last_seen") or payload.get("valid_from") or now)) / _DAY_S
        recency = math.pow(0.5, age_days / cur.half_life_days)
        score = point.similarity * (1 - cur.quality_weight + cur.quality_weight * quality)
        score *= 1 - cur.recency_weight + cur.recency_weight * recency
        return Recalled(
            memory_id=point.id,
            kind=str(payload.get("kind")),
            text=str(payload.get("text")),
            score=round(score, 6),
            similarity=round(point.similarity, 6),
            source_goal=payload.get("source_goal"),
            label=payload.get("label"),
            version=int(payload.get("version") or 1),
            quality=quality,
            tenant=str(payload.get("tenant")),
            subject=payload.get("subject"),
            source=str(payload.get("source")),
        )


def _match(key: str, value: str | bool) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _keep(best: dict[str, _Point], point: _Point) -> None:
    if point.id not in best or best[point.id].similarity < point.similarity:
        best[point.id] = point
