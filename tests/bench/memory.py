"""`make bench-memory`: the quality of semantic memory, per offline embedder, on seeded goal streams.

The generated streams (tests/bench/memory_gen.py) go through the memory service's own handlers
(record, remember_fact, recall), so this measures the real curated write path and read path, on
Qdrant local mode and the local Redis. It reports; it does not gate: missed targets exit 0.
Speed is printed beside a baseline measured in the same run: a Redis PING round trip, and a raw
Qdrant query (no filter, vector given) on the same collection.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from datetime import UTC, datetime, timedelta
from math import log2
from pathlib import Path
from typing import Any

from qdrant_client import AsyncQdrantClient, models
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from memory.embeddings import Embedder, HashingEmbedder, WordLlamaEmbedder
from memory.keys import RedisKeys
from memory.semantic import SemanticMemory
from memory.timeline import GoalTimeline
from schemas.events import MemoryHit, MemoryRecallCompleted, MemoryRecallRequested, TaskAssigned, ToolCallRequested
from services.agents.context import assemble, context_tokens
from services.agents.settings import AgentSettings
from services.memory_service import logic
from services.runtime.catalogue import PACKAGED_PROMPTS, AgentCatalogue
from services.runtime.offline_model import estimate_tokens
from services.runtime.prompts import PromptLibrary
from services.runtime.settings import RedisSettings
from tests.bench.memory_gen import TENANTS, Corpus, Probe, filler, generate
from tests.bench.stats import percentile
from tests.support.redis import drop_namespace_keys

SEED = int(os.environ.get("BENCH_SEED", "7"))
MEMORIES = int(os.environ.get("BENCH_MEMORIES", "10000"))
QUERIES = int(os.environ.get("BENCH_QUERIES", "100"))
"""Timed recalls at BENCH_MEMORIES (and as many baseline round trips)."""
K = 10
console = Console(width=160)


@dataclass
class Run:
    """What one embedder scored."""

    embedder: str
    threshold: float
    probes: dict[str, int] = field(default_factory=dict)
    ranks: list[int | None] = field(default_factory=list)
    """recall and conflict probes: the rank (1-based) of the first right answer, None if not in the top K."""
    conflict_top: list[bool] = field(default_factory=list)
    conflict_stale: list[bool] = field(default_factory=list)
    leaks: int = 0
    leak_checks: int = 0
    duplicate_writes: int = 0
    duplicates_merged: int = 0
    mistakes_found: list[bool] = field(default_factory=list)
    no_answer_easy: list[bool] = field(default_factory=list)
    no_answer_hard: list[bool] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    own_history: list[int] = field(default_factory=list)
    memories_written: int = 0
    write_ms: list[float] = field(default_factory=list)
    stored: int = 0
    ranks_full: list[int | None] = field(default_factory=list)
    """The same probes again once the store holds BENCH_MEMORIES."""
    recall_ms: list[float] = field(default_factory=list)
    embed_ms: list[float] = field(default_factory=list)
    raw_qdrant_ms: list[float] = field(default_factory=list)
    filtered_qdrant_ms: list[float] = field(default_factory=list)
    ping_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


def first_rank(hits: list[str], expected: frozenset[str]) -> int | None:
    return next((i for i, text in enumerate(hits, start=1) if text in expected), None)


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await fn()
    return (time.perf_counter() - started) * 1000, result


async def ask(deps: logic.MemoryDeps, probe: Probe, n: int, k: int = K) -> list[MemoryHit]:
    """A recall through the memory service's handler, as an agent's task would ask it."""
    request = MemoryRecallRequested(
        tenant=probe.tenant, goal_id=f"probe-{n}", task_id=f"probe-{n}.r1", request_id=f"probe-{n}.m1",
        query=probe.query, k=k, reply_to="bench.agent.researcher",
    )
    [reply] = await logic.recall(deps, request)
    assert isinstance(reply.event, MemoryRecallCompleted)
    return reply.event.hits


async def record_streams(deps: logic.MemoryDeps, corpus: Corpus, run: Run) -> None:
    """Every event through `record`, as the recorder sees the work topics; `remember_fact`
    requests also through the tool handler, and recall requests through `recall`."""
    curated = {"task.completed", "task.failed"}
    for stream in corpus.streams:
        for event in stream.events:
            if isinstance(event, ToolCallRequested) and event.tool == "remember_fact":
                ms, _ = await timed(partial(logic.remember_fact, deps, event))
                run.write_ms.append(ms)
            elif isinstance(event, MemoryRecallRequested):
                await logic.recall(deps, event)
            if event.event_type in curated:
                ms, _ = await timed(partial(logic.record, deps, event))
                run.write_ms.append(ms)
            else:
                await logic.record(deps, event)
    run.memories_written = len(run.write_ms)


async def stored_points(semantic: SemanticMemory) -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = []
    offset: Any = None
    while True:
        points, offset = await semantic.client.scroll(semantic.collection, limit=1000, offset=offset, with_payload=True)
        payloads += [dict(p.payload or {}) for p in points]
        if offset is None:
            return payloads


async def score_duplicates(semantic: SemanticMemory, corpus: Corpus, run: Run) -> None:
    """A group written n times should be one stored memory (current or not): n - 1 merges."""
    stored: dict[tuple[str, str], int] = defaultdict(int)
    for payload in await stored_points(semantic):
        stored[(str(payload.get("tenant")), str(payload.get("text")))] += 1
    for group in corpus.duplicates:
        points = max(1, sum(stored[(group.tenant, text)] for text in group.texts))
        run.duplicate_writes += group.writes - 1
        run.duplicates_merged += max(0, group.writes - points)


async def tenant_history_tokens(deps: logic.MemoryDeps, corpus: Corpus) -> dict[str, int]:
    """The naive full context: every event of the tenant's goals recorded so far, read back."""
    tokens: dict[str, int] = defaultdict(int)
    for stream in corpus.streams:
        for entry in await deps.timeline.read(stream.tenant, stream.goal_id):
            tokens[stream.tenant] += estimate_tokens(entry.payload.decode())
    return tokens


async def score_probes(deps: logic.MemoryDeps, corpus: Corpus, run: Run) -> None:
    foreign = {t: set().union(*(corpus.texts[o] for o in TENANTS if o != t)) - corpus.texts[t] for t in TENANTS}
    history = await tenant_history_tokens(deps, corpus)
    agent = AgentSettings()
    kind = AgentCatalogue.load().get("researcher")
    system = PromptLibrary(PACKAGED_PROMPTS).latest(kind.prompt).text
    for n, probe in enumerate(corpus.probes):
        run.probes[probe.kind] = run.probes.get(probe.kind, 0) + 1
        hits = await ask(deps, probe, n)
        texts = [h.text for h in hits]
        run.leak_checks += len(hits)
        run.leaks += sum(text in foreign[probe.tenant] for text in texts)
        if probe.kind in ("recall", "conflict"):
            rank = first_rank(texts, probe.expected)
            run.ranks.append(rank)
            if probe.kind == "conflict":
                run.conflict_top.append(rank == 1)
                run.conflict_stale.append(any(text in probe.stale for text in texts))
        elif probe.kind == "mistake":
            run.mistakes_found.append(any(
                h.kind == "lesson" and h.label is not None and f"({probe.label})" in h.label and h.source_goal == probe.source_goal
                for h in hits[:5]
            ))
        else:
            (run.no_answer_hard if probe.hard else run.no_answer_easy).append(not hits)
        # The context of this task's next model call, with what an agent would be served.
        task = TaskAssigned(
            tenant=probe.tenant, goal_id=f"probe-{n}", task_id=f"probe-{n}.r1", kind="researcher",
            instruction=probe.query, goal_text=probe.query,
        )
        assembled = assemble(
            system=system, task=task, memories=hits[: agent.recall_k], scratchpad=list(probe.scratchpad),
            budget_tokens=agent.context_tokens, tool_output_chars=agent.tool_output_chars,
        )
        head = context_tokens([{"role": "system", "content": system}, {"role": "user", "content": probe.query}])
        run.context.append(assembled.tokens)
        run.history.append(head + history[probe.tenant] + context_tokens(list(probe.scratchpad)))
        run.own_history.append(assembled.full_history_tokens)


async def fill_and_time(deps: logic.MemoryDeps, corpus: Corpus, run: Run, redis: Redis) -> None:
    """Fill the store to BENCH_MEMORIES with distractors, then time recalls beside the baselines."""
    semantic = deps.semantic
    have = len(await stored_points(semantic))
    extra = filler(corpus.seed, max(0, MEMORIES - have))
    for i in range(0, len(extra), 1000):
        await semantic.load_raw(extra[i : i + 1000])
    run.stored = len(await stored_points(semantic))
    answerable = [p for p in corpus.probes if p.kind in ("recall", "conflict")]
    for n, probe in enumerate(answerable):
        hits = await ask(deps, probe, 10_000 + n)
        run.ranks_full.append(first_rank([h.text for h in hits], probe.expected))
    queries = [corpus.probes[i % len(corpus.probes)] for i in range(QUERIES)]
    [vector] = await semantic.embedder.embed([queries[0].query])
    for i in range(-10, QUERIES):  # the first ten warm up
        probe = queries[max(i, 0)]
        ping, _ = await timed(redis.ping)
        embed, _ = await timed(partial(semantic.embedder.embed, [probe.query]))
        raw, _ = await timed(lambda: semantic.client.query_points(semantic.collection, query=vector, limit=K))
        tenant = models.Filter(must=[models.FieldCondition(key="tenant", match=models.MatchValue(value=probe.tenant))])
        filtered, _ = await timed(lambda: semantic.client.query_points(semantic.collection, query=vector, query_filter=tenant, limit=K))
        ms, found = await timed(partial(semantic.recall, probe.tenant, probe.query, K))
        run.leak_checks += len(found)
        run.leaks += sum(r.tenant != probe.tenant for r in found)
        if i >= 0:
            run.ping_ms.append(ping)
            run.embed_ms.append(embed)
            run.raw_qdrant_ms.append(raw)
            run.filtered_qdrant_ms.append(filtered)
            run.recall_ms.append(ms)


async def bench(embedder: Embedder, corpus: Corpus, redis: Redis, data: Path) -> Run:
    started = time.perf_counter()
    namespace = f"bench-mem-{uuid.uuid4().hex[:10]}"
    keys = RedisKeys(namespace)
    client = AsyncQdrantClient(path=str(data / embedder.name))
    semantic = SemanticMemory(client, embedder, namespace, local=True, redis=redis, keys=keys)
    deps = logic.MemoryDeps(
        semantic=semantic, timeline=GoalTimeline(redis, keys, maxlen=10_000, ttl_s=3_600), redis=redis, keys=keys,
        audit_topic=f"{namespace}.audit",
    )
    run = Run(embedder.name, semantic.curation.min_score)
    try:
        await semantic.ensure_collection()
        console.print(f"[dim]{embedder.name}: recording {sum(len(s.events) for s in corpus.streams)} events of {len(corpus.streams)} goals…[/]")
        await record_streams(deps, corpus, run)
        await score_duplicates(semantic, corpus, run)
        console.print(f"[dim]{embedder.name}: {len(corpus.probes)} probes…[/]")
        await score_probes(deps, corpus, run)
        console.print(f"[dim]{embedder.name}: filling to {MEMORIES} memories, {QUERIES} timed recalls…[/]")
        await fill_and_time(deps, corpus, run, redis)
    finally:
        await client.close()
        await drop_namespace_keys(redis, namespace)
    run.seconds = time.perf_counter() - started
    return run


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def mark(ok: bool) -> str:
    return "[green]pass[/]" if ok else "[red]short[/]"


def quality_table(runs: list[Run], corpus: Corpus) -> Table:
    table = Table(title=f"Semantic memory quality (seed {corpus.seed}, {len(corpus.streams)} goals, {len(corpus.probes)} probes, one run, one machine)")
    table.add_column("measure")
    table.add_column("target")
    for run in runs:
        table.add_column(f"{run.embedder}\n(min score {run.threshold:g})")

    def row(name: str, target: str, cell: Callable[[Run], str]) -> None:
        table.add_row(name, target, *(cell(r) for r in runs))

    def at(r: Run, k: int, ranks: list[int | None] | None = None) -> float:
        ranks = r.ranks if ranks is None else ranks
        return share([x is not None and x <= k for x in ranks])

    answerable = len(runs[0].ranks)
    row(f"recall@5 ({answerable} answerable)", "", lambda r: f"{at(r, 5):.3f}")
    row(f"recall@10 ({answerable} answerable)", "≥ 0.9", lambda r: f"{at(r, 10):.3f} {mark(at(r, 10) >= 0.9)}")
    row("MRR", "", lambda r: f"{statistics.fmean(1 / x if x else 0.0 for x in r.ranks):.3f}")
    row("nDCG@10", "", lambda r: f"{statistics.fmean(1 / log2(x + 1) if x else 0.0 for x in r.ranks):.3f}")
    row(
        f"conflict accuracy: current version at rank 1 ({len(runs[0].conflict_top)} superseded, {corpus.out_of_order} out of order)",
        "≥ 0.8", lambda r: f"{share(r.conflict_top):.3f} {mark(share(r.conflict_top) >= 0.8)}",
    )
    row("stale rate: a superseded version in the top 10", "", lambda r: f"{share(r.conflict_stale):.3f}")
    row("cross-tenant leaks (hits checked)", "= 0", lambda r: f"{r.leaks} of {r.leak_checks} {mark(r.leaks == 0)}")
    row(
        "duplicates merged (repeat writes of one memory)", "≥ 95%",
        lambda r: f"{r.duplicates_merged}/{r.duplicate_writes} = {r.duplicates_merged / r.duplicate_writes:.1%} "
        f"{mark(r.duplicates_merged >= 0.95 * r.duplicate_writes)}",
    )
    row(
        f"repeat-mistake probes with the labelled failure in the top 5 ({len(runs[0].mistakes_found)})", "≥ 95%",
        lambda r: f"{share(r.mistakes_found):.1%} {mark(share(r.mistakes_found) >= 0.95)}",
    )
    row(
        f"no-answer questions with zero hits above the threshold ({len(runs[0].no_answer_easy)} off-topic, "
        f"{len(runs[0].no_answer_hard)} about unknown services)", "",
        lambda r: f"{share(r.no_answer_easy + r.no_answer_hard):.1%} (off-topic {share(r.no_answer_easy):.0%}, unknown service {share(r.no_answer_hard):.0%})",
    )

    def context(r: Run) -> str:
        ctx, full = statistics.median(r.context), statistics.median(r.history)
        return f"{ctx:.0f} vs {full:,.0f} tokens = {ctx / full:.1%} {mark(ctx <= 0.1 * full)}"

    row("median context tokens vs the full history (tenant's goal events + whole scratchpad)", "≤ 10%", context)
    row(
        "median context tokens vs the task's own uncompressed context (all memories, whole scratchpad)", "",
        lambda r: f"{statistics.median(r.context):.0f} vs {statistics.median(r.own_history):,.0f} = "
        f"{statistics.median(r.context) / statistics.median(r.own_history):.1%}",
    )
    row(
        f"recall@10 with the store filled to {MEMORIES:,} memories", "",
        lambda r: f"{at(r, 10, r.ranks_full):.3f} (recall@5 {at(r, 5, r.ranks_full):.3f}; {r.stored:,} stored)",
    )
    return table


def speed_table(runs: list[Run]) -> Table:
    table = Table(title=f"Recall and write latency (sequential, Qdrant local mode, {QUERIES} timed calls)")
    table.add_column("measure")
    for run in runs:
        table.add_column(run.embedder)

    def ms(values: list[float], base: list[float], name: str) -> str:
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        b50, b95 = percentile(base, 0.5), percentile(base, 0.95)
        return f"p50 {p50:.2f} ms (×{p50 / b50:.0f} {name}), p95 {p95:.2f} ms (×{p95 / b95:.0f})"

    table.add_row("baseline: Redis PING round trip", *(f"p50 {percentile(r.ping_ms, 0.5):.3f} ms, p95 {percentile(r.ping_ms, 0.95):.3f} ms" for r in runs))
    table.add_row(
        "baseline: raw Qdrant query (no filter, vector given)",
        *(ms(r.raw_qdrant_ms, r.ping_ms, "PING") for r in runs),
    )
    table.add_row("  the same with the tenant filter", *(ms(r.filtered_qdrant_ms, r.ping_ms, "PING") for r in runs))
    table.add_row(
        "recall at the filled store (embed + tenant filter + rank)",
        *(f"{ms(r.recall_ms, r.ping_ms, 'PING')}\n×{percentile(r.recall_ms, 0.5) / percentile(r.raw_qdrant_ms, 0.5):.1f} raw Qdrant p50; {r.stored:,} memories" for r in runs),
    )
    table.add_row("  of which: embedding the query", *(ms(r.embed_ms, r.ping_ms, "PING") for r in runs))
    table.add_row(
        "curated write (remember_fact, task outcome or lesson)",
        *(f"{ms(r.write_ms, r.ping_ms, 'PING')}; {r.memories_written} writes" for r in runs),
    )
    table.add_row("wall time of this embedder's run", *(f"{r.seconds:.1f} s" for r in runs))
    return table


def embedders() -> list[Embedder]:
    found: list[Embedder] = []
    try:
        found.append(WordLlamaEmbedder())
    except (ImportError, OSError) as exc:
        console.print(f"[yellow]WordLlamaEmbedder unavailable ({exc}); skipped[/]")
    found.append(HashingEmbedder())
    return found


async def main() -> None:
    url = RedisSettings().url or "redis://127.0.0.1:6379/0"
    # Real-looking timestamps: the goals happened over the last ~5 months, so recency weighs as it would.
    start = (datetime.now(UTC) - timedelta(days=160)).replace(hour=9, minute=0, second=0, microsecond=0)
    corpus = generate(SEED, start=start)
    redis = Redis.from_url(url)
    try:
        await redis.ping()
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for embedder in embedders():
                runs.append(await bench(embedder, corpus, redis, Path(tmp)))
    finally:
        await redis.aclose()
    console.print(quality_table(runs, corpus))
    console.print(speed_table(runs))
    console.print(
        "Streams go through services/memory_service/logic.py (record, remember_fact, recall); probes ask "
        f"through logic.recall with k={K} at the embedder's relevance threshold. A right answer is any wording "
        "written of the current version; a leak is a hit whose text only another tenant wrote (and, for the timed "
        "recalls, a hit whose tenant differs). Duplicates are counted in the store: a memory written n times in "
        "other words should be one point. Context: services/agents/context.py with AgentSettings' budget and "
        "recall_k hits. The store is then filled with distractors (memory_gen.filler) for the latency rows."
    )


if __name__ == "__main__":
    asyncio.run(main())
