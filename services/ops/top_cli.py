"""`switchboard top`: a live view of the namespace's work, read from the end of its topics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from schemas.envelope import Envelope
from schemas.events import decode_event
from schemas.topics import Topics
from services.ops.dlq import DeadLetter
from services.ops.kafka_client import existing_partitions
from services.ops.terminal import console, echo_json, reader_settings, run_async
from services.ops.top import TopSnapshot, TopStats
from services.runtime.settings import KafkaSettings


class NamespaceTail:
    """Reads the namespace's work and dead-letter topics from their end when it started, outside any
    consumer group (it moves no one's offsets). Topics created later are read from their beginning."""

    def __init__(self, kafka: KafkaSettings, topics: Topics) -> None:
        self.kafka = kafka
        self.names = topics.work_topics() + topics.dlq_topics()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.require(), group_id=None, enable_auto_commit=False, auto_offset_reset="latest",
        )
        self.assigned: set[TopicPartition] = set()

    async def start(self) -> None:
        await self.consumer.start()
        await self.find_partitions(at_end=True)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def find_partitions(self, at_end: bool = False) -> None:
        found = set(await existing_partitions(self.kafka, self.names))
        new = found - self.assigned
        if not new:
            return
        # A new assignment forgets positions: keep those of the partitions read so far.
        positions = {tp: await self.consumer.position(tp) for tp in self.assigned}
        self.consumer.assign(list(self.assigned | new))
        for tp, offset in positions.items():
            self.consumer.seek(tp, offset)
        if at_end:
            ends = await self.consumer.end_offsets(list(new))
            for tp, offset in ends.items():
                self.consumer.seek(tp, offset)
        else:
            await self.consumer.seek_to_beginning(*new)
        self.assigned |= new

    async def feed(self, stats: TopStats, seconds: float) -> None:
        """Hands `stats` everything read within the next `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.assigned:
                await asyncio.sleep(left)  # nothing to read until the next look for topics
                return
            batches = await self.consumer.getmany(timeout_ms=max(1, int(min(left, 0.5) * 1000)))
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    observed = _observed(record)
                    if observed is not None:
                        stats.observe(observed, now)


def _observed(record: ConsumerRecord) -> DeadLetter | Envelope | None:
    if Topics.is_dlq(record.topic):
        return DeadLetter.from_record(record)
    try:
        return decode_event(record.value or b"")
    except (ValidationError, ValueError):
        return None  # not an event: nothing to count (the pipeline dead-letters it, and that is counted)


@asynccontextmanager
async def tailing(kafka: KafkaSettings, topics: Topics) -> AsyncIterator[NamespaceTail]:
    tail = NamespaceTail(kafka, topics)
    await tail.start()
    try:
        yield tail
    finally:
        await tail.stop()


def top_view(snapshot: TopSnapshot, topics: Topics, interval: float) -> RenderableType:
    stamp = Text(
        f"{datetime.now(UTC):%H:%M:%S} UTC, namespace {topics.namespace}, rates over the last {snapshot.window_s:.0f}s, "
        f"every {interval:g}s; Ctrl-C to stop",
        style="dim",
    )
    head = (
        f"[bold]{snapshot.goals_in_flight}[/] goal(s) in flight, {snapshot.goals_waiting_for_human} waiting for a "
        f"person; {snapshot.goals_completed} completed and "
        f"{snapshot.goals_failed} failed since start\n"
        f"[bold]{snapshot.llm_calls_per_s:.2f}[/] model calls/s, [bold]{snapshot.tokens_per_s:.0f}[/] tokens/s, "
        f"[bold]${snapshot.cost_per_min:.4f}[/]/min; since start {snapshot.llm_calls} calls, {snapshot.tokens} tokens, "
        f"${snapshot.cost_usd:.4f}"
    )
    steps = Table(title="agent steps", title_justify="left")
    steps.add_column("agent kind")
    steps.add_column("steps/s", justify="right")
    for kind, rate in snapshot.steps_per_s.items():
        steps.add_row(escape(kind), f"{rate:.2f}")
    tenants = Table(title="budget burn per tenant", title_justify="left")
    for name in ("tenant", "in flight", "tokens/s", "$/min", "$ since start", "failed on budget"):
        tenants.add_column(name, justify="left" if name == "tenant" else "right")
    for t in snapshot.tenants:
        tenants.add_row(
            escape(t.tenant), str(t.in_flight), f"{t.tokens_per_s:.0f}", f"{t.cost_per_min:.4f}", f"{t.spent_usd:.4f}",
            str(t.budget_failures), style="red" if t.budget_failures else "",
        )
    letters = Table(title="dead-letter growth", title_justify="left")
    for name in ("topic", "reason", "per min", "added since start"):
        letters.add_column(name, justify="left" if name in ("topic", "reason") else "right")
    for d in snapshot.dead_letters:
        letters.add_row(
            escape(d.dlq_topic.removeprefix(f"{topics.namespace}.")), escape(d.reason), f"{d.per_min:.1f}", str(d.added),
            style="red" if d.per_min else "",
        )
    return Group(stamp, Text.from_markup(head), steps, tenants, letters)


def top(
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes (and, with --once or --json, how long to watch).")] = 2.0,
    window: Annotated[float, typer.Option(min=1.0, help="Seconds the rates are measured over (a sliding window).")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Watch for --interval seconds, print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Like --once, printing one JSON document (for scripts).")] = False,
) -> None:
    """Show live what the namespace is doing: goals in flight; agent steps per second per agent
    kind; model tokens per second and cost per minute; budget burn per tenant; dead-letter growth.

    Reads every work topic and dead-letter topic of the namespace from its end, outside any consumer
    group (it moves no one's offsets), so it counts what happens while it runs: a goal is in flight
    once its submission or plan is seen, until its end is. Steps are the agents' model calls; the
    rates are over the last --window seconds (less, while top has run for less). Budget burn is a
    tenant's model spend per minute, and how many of its goals failed on a budget or deadline. The
    dead-letter growth is per dead-letter topic and reason (the x-dlq-reason header).

    Refreshes every --interval seconds until Ctrl-C. --json prints {"window_s", "goals_in_flight", "goals_waiting_for_human",
    "steps_per_s": {kind: rate}, "llm_calls_per_s", "tokens_per_s", "cost_per_min", "tenants": [{"tenant",
    "in_flight", "tokens_per_s", "cost_per_min", "spent_usd", "budget_failures"}], "dead_letters":
    [{"dlq_topic", "reason", "per_min", "added"}], and the totals since start}.
    """
    settings, topics = reader_settings()

    async def main() -> int:
        stats = TopStats(window_s=window, started=time.monotonic())
        async with tailing(settings.kafka, topics) as tail:
            if once or as_json:
                await tail.feed(stats, interval)
                snapshot = stats.snapshot(time.monotonic())
                if as_json:
                    echo_json(snapshot.to_json())
                else:
                    console.print(top_view(snapshot, topics, interval))
                return 0
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    live.update(top_view(stats.snapshot(time.monotonic()), topics, interval), refresh=True)
                    await tail.feed(stats, interval)
                    await tail.find_partitions()

    raise typer.Exit(run_async(main()))
