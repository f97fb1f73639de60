"""Response caching on a workload with repeated goals: the same deployment run twice on the real
local Kafka and Redis, caching off for every agent kind and then on for every agent kind.

`make bench` runs it from tests/bench/pipeline.py; by hand:
`KAFKA_BOOTSTRAP_SERVERS=... REDIS_URL=... python -m tests.bench.cache`.

Every figure comes from the LLMCallRecorded events of the run (the llm-calls topic) and from its
own clock; nothing is derived from what caching should save.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from schemas.events import GoalCompleted, GoalFailed, GoalSubmitted, LLMCallRecorded
from schemas.topics import Topics
from services.runtime.catalogue import PACKAGED_KINDS
from services.runtime.settings import KafkaSettings, LLMSettings, RedisSettings
from tests.support.deployment import Deployment, make_deployment
from tests.support.kafka import RawProducer, Seen, TopicWatch, drop_namespace_topics
from tests.support.redis import drop_namespace_keys

GOALS = (
    "What is 12*7 and what is 3+4?",
    "What is 9*8 and what is 15-6?",
    "What is 144/12 and what is 7*6?",
    "What is Apache Kafka and what is 21*2?",
    "What is Redis and what is 100-58?",
    "What is a consumer group and what is 6*7+1?",
)
"""The distinct goals: each planned as 2 research tasks and 1 writing task, 8 model calls."""
REPEATS = int(os.environ.get("BENCH_CACHE_REPEATS", "3"))
LATENCY_MS = os.environ.get("BENCH_CACHE_LATENCY_MS", "500")
WARM_UP = "What is 1+1?"  # not in the workload: it warms the deployment, not the cache
GROUPS = ("orchestrator", "agent.researcher", "agent.writer", "tools", "memory", "memory-recorder")
TOLERANCE = 0.01  # cost paid (on) + cost saved (on) against cost paid (off), relative


def offline_price() -> float:
    """The offline model's price per 1,000 tokens: LLM_OFFLINE_COST_PER_1K_TOKENS when set, else
    $0.01 (its default, 0, would make every cost in the report 0)."""
    return LLMSettings().offline_cost_per_1k_tokens or 0.01


@dataclass
class CacheRun:
    cached: bool
    seconds: float
    round_seconds: list[float]
    records: list[LLMCallRecorded]
    answers: dict[str, str]  # goal id -> final answer
    namespace: str = ""

    @property
    def goals(self) -> int:
        return len(self.answers)

    @property
    def calls(self) -> int:
        """Model calls made: recorded calls not answered from the cache."""
        return sum(1 for r in self.records if not r.cache_hit)

    @property
    def hits(self) -> int:
        return sum(1 for r in self.records if r.cache_hit)

    @property
    def tokens_paid(self) -> int:
        return sum(r.input_tokens + r.output_tokens for r in self.records)

    @property
    def cost_paid(self) -> float:
        return sum(r.cost_usd for r in self.records)

    @property
    def tokens_saved(self) -> int:
        return sum(r.saved_tokens for r in self.records)

    @property
    def cost_saved(self) -> float:
        return sum(r.saved_cost_usd for r in self.records)

    def by_agent(self) -> dict[str, tuple[int, int]]:
        """agent -> (calls recorded, cache hits)."""
        recorded, hits = Counter(r.agent for r in self.records), Counter(r.agent for r in self.records if r.cache_hit)
        return {agent: (recorded[agent], hits[agent]) for agent in sorted(recorded)}

    def answer_of(self, distinct: int) -> set[str]:
        """The final answers of every repeat of one distinct goal (one, when they all agree)."""
        return {a for goal_id, a in self.answers.items() if goal_id.startswith(f"g-{distinct}-")}


def cached_kinds(root: Path) -> Path:
    """The packaged catalogue with `cache = true` on every agent kind."""
    kinds = root / "kinds-cached"
    kinds.mkdir(parents=True, exist_ok=True)
    for packaged in sorted(PACKAGED_KINDS.glob("*.toml")):
        text = packaged.read_text()
        if "cache" in tomllib.loads(text):
            raise RuntimeError(f"{packaged} sets cache itself: this bench switches it on for every kind")
        # First in the file, so that it is a top-level key whatever tables the file has.
        (kinds / packaged.name).write_text("cache = true\n" + text)
    return kinds


async def clean_up(d: Deployment, redis_url: str) -> None:
    """The run's topics, and its Redis keys (state, checkpoints, budgets, the response cache)."""
    await drop_namespace_topics(d.kafka, d.namespace)
    redis = Redis.from_url(redis_url)
    try:
        await drop_namespace_keys(redis, d.namespace)
    finally:
        await redis.aclose()


async def finished(watch: TopicWatch, goal_ids: set[str], timeout: float) -> dict[str, str]:
    """The answers of these goals, once every one has completed; a failed goal fails the bench."""

    def ended(s: Seen) -> bool:
        return isinstance(s.event, GoalCompleted | GoalFailed) and s.event.goal_id in goal_ids

    await watch.until(lambda seen: {s.event.goal_id for s in seen if ended(s) and s.event} >= goal_ids, timeout=timeout)
    seen = [s for s in watch.seen if ended(s)]
    failed = [s.event for s in seen if isinstance(s.event, GoalFailed)]
    if failed:
        raise RuntimeError(f"goals failed: {[(e.goal_id, e.reason, e.detail) for e in failed]}")
    return {s.event.goal_id: s.event.answer for s in seen if isinstance(s.event, GoalCompleted)}


async def run_workload(root: Path, cached: bool, price: float) -> CacheRun:
    """One deployment (a `switchboard serve all` process) answering every goal REPEATS times: each
    round submits the distinct goals at once and waits for all of them, so a repeat comes after the
    first answer was stored."""
    root.mkdir(parents=True, exist_ok=True)
    extra = {"SWITCHBOARD_AGENTS_DIR": str(cached_kinds(root))} if cached else {}
    d = make_deployment(
        root, partitions=3, LLM_OFFLINE_LATENCY_MS=LATENCY_MS, LLM_OFFLINE_COST_PER_1K_TOKENS=str(price),
        SWITCHBOARD_LOG_LEVEL="WARNING",
        # Recall would put what earlier goals taught into a repeat's messages, and when it lands
        # depends on timing: with it off, a repeat asks the model exactly what the first asked.
        AGENT_RECALL_K="0",
        **extra,
    )
    d.start("replica", "all")
    try:
        await d.members_settled({group: 1 for group in GROUPS}, timeout=180)
        t = Topics(d.namespace, ("researcher", "writer"))
        async with TopicWatch(d.kafka, [t.progress, t.llm_calls]) as watch, RawProducer(d.kafka) as send:
            await send.event(t.goals, GoalSubmitted(tenant="default", goal_id="g-warm", text=WARM_UP))
            await finished(watch, {"g-warm"}, timeout=120)
            answers: dict[str, str] = {}
            rounds: list[float] = []
            started = time.perf_counter()
            for r in range(REPEATS):
                round_started = time.perf_counter()
                ids = {f"g-{i}-{r}": text for i, text in enumerate(GOALS)}
                for goal_id, text in ids.items():
                    await send.event(t.goals, GoalSubmitted(tenant="default", goal_id=goal_id, text=text))
                answers |= await finished(watch, set(ids), timeout=300)
                rounds.append(time.perf_counter() - round_started)
            seconds = time.perf_counter() - started
            # Every call's record is on the llm-calls topic by the time its goal completes (it is
            # produced with the step's outputs); read to the end to be sure of it.
            await watch.caught_up()
            records = [
                s.event for s in watch.seen
                if isinstance(s.event, LLMCallRecorded) and s.event.goal_id in answers
            ]
        d.assert_alive()
        return CacheRun(cached, seconds, rounds, records, answers, d.namespace)
    finally:
        d.stop()
        await clean_up(d, d.env["REDIS_URL"])


async def measure_cache(root: Path, console: Console) -> tuple[CacheRun, CacheRun, float]:
    price = offline_price()
    workload = f"{len(GOALS)} distinct goals × {REPEATS}, model {LATENCY_MS} ms"
    console.print(f"[dim]response cache: {workload}, caching off…[/]")
    off = await run_workload(root / "cache-off", cached=False, price=price)
    console.print(f"[dim]response cache: {workload}, caching on for every agent kind…[/]")
    on = await run_workload(root / "cache-on", cached=True, price=price)
    return off, on, price


def ratio(on: float, off: float) -> str:
    return f"×{on / off:.2f}" if off else "-"


def report(console: Console, off: CacheRun, on: CacheRun, price: float) -> bool:
    """Prints the table and its checks; True when both checks hold."""
    table = Table(title=f"Response cache on repeated goals ({len(GOALS)} distinct × {REPEATS}, offline model, one run, one machine)")
    for column in ("measure", "caching off", "caching on", "on / off"):
        table.add_column(column)
    recorded_on = len(on.records)
    agent_steps = sum(1 for r in on.records if r.agent != "orchestrator")
    rows = [
        ("LLM calls recorded", f"{len(off.records)}", f"{recorded_on}", ratio(recorded_on, len(off.records))),
        ("model calls made", f"{off.calls}", f"{on.calls}", ratio(on.calls, off.calls)),
        ("cache hits", f"{off.hits}", f"{on.hits}", ""),
        ("hit rate, all calls", f"{off.hits / len(off.records):.0%}", f"{on.hits / recorded_on:.0%}", ""),
        ("hit rate, agent steps (the cached calls)", "-", f"{on.hits / agent_steps:.0%}" if agent_steps else "-", ""),
        ("tokens paid", f"{off.tokens_paid:,}", f"{on.tokens_paid:,}", ratio(on.tokens_paid, off.tokens_paid)),
        ("cost paid", f"${off.cost_paid:.6f}", f"${on.cost_paid:.6f}", ratio(on.cost_paid, off.cost_paid)),
        ("tokens saved", f"{off.tokens_saved:,}", f"{on.tokens_saved:,}", ""),
        ("cost saved", f"${off.cost_saved:.6f}", f"${on.cost_saved:.6f}", ""),
        (
            "wall time per goal", f"{off.seconds / off.goals * 1000:.0f} ms", f"{on.seconds / on.goals * 1000:.0f} ms",
            ratio(on.seconds, off.seconds),
        ),
        (
            "wall time per goal, first round", f"{off.round_seconds[0] / len(GOALS) * 1000:.0f} ms",
            f"{on.round_seconds[0] / len(GOALS) * 1000:.0f} ms", ratio(on.round_seconds[0], off.round_seconds[0]),
        ),
    ]
    if REPEATS > 1:
        off_rep, on_rep = sum(off.round_seconds[1:]), sum(on.round_seconds[1:])
        n = len(GOALS) * (REPEATS - 1)
        rows.append(("wall time per goal, repeat rounds", f"{off_rep / n * 1000:.0f} ms", f"{on_rep / n * 1000:.0f} ms", ratio(on_rep, off_rep)))
    for row in rows:
        table.add_row(*row)
    console.print(table)

    hits = ", ".join(f"{agent} {h}/{n}" for agent, (n, h) in on.by_agent().items())
    console.print(f"Cache hits by caller, caching on (hits/calls): {hits}.")
    expected = on.cost_paid + on.cost_saved
    gap = abs(expected - off.cost_paid)
    cost_ok = gap <= TOLERANCE * off.cost_paid
    tokens_gap = on.tokens_paid + on.tokens_saved - off.tokens_paid
    console.print(
        f"Check, cost paid (on) + cost saved (on) ≈ cost paid (off): ${on.cost_paid:.6f} + ${on.cost_saved:.6f} = "
        f"${expected:.6f} against ${off.cost_paid:.6f}, difference ${gap:.6f} ({gap / off.cost_paid:.2%}): "
        + ("[green]holds[/]" if cost_ok else f"[red]does not hold (tolerance {TOLERANCE:.0%})[/]")
        + f"; in tokens the difference is {tokens_gap:+,}."
    )
    same = [i for i in range(len(GOALS)) if len(off.answer_of(i)) == 1 and off.answer_of(i) == on.answer_of(i)]
    answers_ok = len(same) == len(GOALS)
    console.print(
        f"Check, the same final answer in both runs for every repeat of each distinct goal: {len(same)}/{len(GOALS)} "
        + ("[green]holds[/]" if answers_ok else "[red]does not hold[/]")
    )
    kinds = sorted(p.stem for p in PACKAGED_KINDS.glob("*.toml"))
    for i in sorted(set(range(len(GOALS))) - set(same)):
        console.print(f"  [red]{GOALS[i]!r}[/]: off {sorted(off.answer_of(i))!r}, on {sorted(on.answer_of(i))!r}")
    console.print(
        f"The workload: {len(GOALS)} distinct goals, each submitted {REPEATS} times on one `switchboard serve all` "
        f"process with the offline model at {LATENCY_MS} ms a call; a round submits every distinct goal at once and "
        "waits for their answers, so each repeat comes after its goal's first answer. It runs twice, each in its own "
        f"namespace: caching off, then `cache = true` on every agent kind ({', '.join(kinds)}). The cache answers the "
        "agents' step calls only; the orchestrator's plan and answer calls are never cached. Wall time per goal is "
        f"the run's (or the rounds') wall time over its goals, {len(GOALS)} at a time. Recall is off "
        "(AGENT_RECALL_K=0) so that a repeat's messages are the first one's. The offline model is priced at "
        f"${price} per 1,000 tokens, input and output (LLMSettings.offline_cost_per_1k_tokens, "
        "LLM_OFFLINE_COST_PER_1K_TOKENS; $0.01 here when unset). Every figure is read from the runs' LLMCallRecorded "
        "events: a hit records 0 tokens and $0 paid, and as saved the tokens and cost of the call that stored it."
    )
    return cost_ok and answers_ok


async def main() -> None:
    if not KafkaSettings().bootstrap_servers or not RedisSettings().url:
        raise SystemExit("this needs the local Kafka and Redis; set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL")
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as tmp:
        off, on, price = await measure_cache(Path(tmp), console)
    report(console, off, on, price)


if __name__ == "__main__":
    asyncio.run(main())
