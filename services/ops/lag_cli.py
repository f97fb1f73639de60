"""`switchboard lag`: consumer lag per group and partition, in offsets and in seconds, with Burrow's
statuses; once, live (`--watch`), as JSON, or as a Prometheus exporter (`--serve PORT`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Annotated

import typer
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rich.console import Group as Stack
from rich.console import RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from services.ops.lag import STATUS_RULES, GroupLag, LagStatus, select_groups
from services.ops.lag_reader import GroupSelector, LagReader
from services.ops.terminal import console, echo_json, err, reader_settings, run_async
from services.runtime.metrics import serve_metrics

LAG_OFFSETS = "switchboard_consumer_lag_offsets"
LAG_SECONDS = "switchboard_consumer_lag_seconds"
STATUS = "switchboard_consumer_status"

_STYLE = {LagStatus.OK: "green", LagStatus.WARN: "yellow"}  # the rest: red


class LagCollector(Collector):
    """Exports the latest snapshot it was given; `--serve` gives it a new one every interval.
    It lives in its own CollectorRegistry, so nothing is registered globally."""

    def __init__(self) -> None:
        self.groups: list[GroupLag] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["group", "topic", "partition"]
        offsets = GaugeMetricFamily(LAG_OFFSETS, "Records the group has not committed yet: end offset minus committed offset.", labels=labels)
        seconds = GaugeMetricFamily(LAG_SECONDS, "Age of the first record the group has not consumed (0 without lag).", labels=labels)
        status = GaugeMetricFamily(STATUS, "1 for the partition's current Burrow status, 0 for the others.", labels=[*labels, "status"])
        for group in self.groups:
            for p in group.partitions:
                key = [group.group, p.topic, str(p.partition)]
                offsets.add_metric(key, p.lag)
                if p.lag_seconds is not None:
                    seconds.add_metric(key, p.lag_seconds)
                for s in LagStatus:
                    status.add_metric([*key, s.value], 1.0 if s is p.status else 0.0)
        yield from (offsets, seconds, status)


def lag_view(groups: Sequence[GroupLag], namespace: str, all_groups: bool) -> RenderableType:
    """One table per group, titled with its rolled-up status, state and total lag."""
    if not groups:
        where = "on the cluster" if all_groups else f"in namespace {escape(namespace)} (--all-groups for every group)"
        return Text.from_markup(f"no consumer groups {where}")
    tables: list[RenderableType] = []
    for g in groups:
        style = _STYLE.get(g.status, "red")
        table = Table(title=f"{escape(g.group)}  [{style}]{g.status.value}[/]  {escape(g.state)}, lag {g.lag}", title_justify="left")
        for name in ("topic", "partition", "committed", "end", "lag", "lag (s)", "owner", "status", "window"):
            table.add_column(name, overflow="fold", justify="right" if name in ("partition", "committed", "end", "lag", "lag (s)") else "left")
        for p in g.partitions:
            seconds = "?" if p.lag_seconds is None else f"{p.lag_seconds:.1f}"
            owner = "-" if p.owner is None else escape(p.owner.label())
            row_style = _STYLE.get(p.status, "red")
            table.add_row(
                escape(p.topic), str(p.partition), str(p.committed), str(p.end), str(p.lag), seconds, owner,
                f"[{row_style}]{p.status.value}[/]", str(len(p.window)),
            )
        tables.append(table)
    return Stack(*tables)


def _rules_help() -> str:
    rules = " ".join(f"{status.value}: {rule}." for status, rule in STATUS_RULES.items())
    return f"""Consumer lag per group, topic and partition, with Burrow's status.

    Every consumer group of the namespace (groups named <namespace>.<name>), per topic and partition: the committed offset, the end offset, the lag (end minus committed), the lag
    in seconds (now minus the timestamp of the first record not consumed yet; 0 without lag), the
    member that owns the partition (client id@host), and a status over the window of the partition's
    last --window offset commits, read from __consumer_offsets outside any group, like Burrow. A
    group shows its worst partition.

    The status follows Burrow's rules, tried in this order; the lag at a commit is the partition's
    end offset at that time (the first offset with a later record timestamp) minus the committed
    offset. {rules}

    Partitions the group has never committed on are not shown. Exits 0; 2 on a bad option or
    unreachable Kafka. --serve PORT exports {LAG_OFFSETS}, {LAG_SECONDS} and {STATUS} (labels group,
    topic, partition; status also) at http://HOST:PORT/metrics, refreshed every --interval."""


def lag(
    group: Annotated[list[str] | None, typer.Option("--group", "-g", help="Only groups with this name or name prefix (any namespace). Repeatable.")] = None,
    all_groups: Annotated[bool, typer.Option("--all-groups", help="Every consumer group on the cluster, not only the namespace's.")] = False,
    window: Annotated[int, typer.Option(min=2, help="Commits per partition in the status window (Burrow's default: 10).")] = 10,
    history: Annotated[int, typer.Option(min=1, help="How many records back to read in each __consumer_offsets partition that holds the groups, for their windows.")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts) instead of tables.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep the tables on screen, refreshed every --interval, until interrupted.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes of --watch and --serve.")] = 5.0,
    serve: Annotated[int | None, typer.Option("--serve", min=1, max=65535, metavar="PORT", help="Serve the lag as Prometheus metrics on this port until interrupted.")] = None,
    bind: Annotated[str, typer.Option(help="Address --serve listens on.")] = "0.0.0.0",
) -> None:
    if as_json and (watch or serve is not None):
        raise typer.BadParameter("--json prints one document; it does not go with --watch or --serve", param_hint="--json")
    settings, topics = reader_settings()
    select = partial(select_groups, namespace=topics.namespace, prefixes=group or [], all_groups=all_groups)

    async def main() -> int:
        async with LagReader(settings.kafka, window=window, history=history) as reader:
            if as_json:
                groups = await reader.snapshot(select)
                echo_json({"at": datetime.now(UTC).isoformat(), "window": window, "groups": [g.summary() for g in groups]})
                return 0
            if serve is None and not watch:
                console.print(lag_view(await reader.snapshot(select), topics.namespace, all_groups))
                return 0
            await refresh_forever(reader, select, interval, watch, serve, bind, topics.namespace, all_groups)
        return 0

    raise typer.Exit(run_async(main()))


lag.__doc__ = _rules_help()


async def refresh_forever(
    reader: LagReader, select: GroupSelector, interval: float, watch: bool, port: int | None, bind: str,
    namespace: str, all_groups: bool,
) -> None:
    """Takes a snapshot every `interval` seconds for the live view and/or the exporter, until cancelled."""
    collector = LagCollector()
    with contextlib.ExitStack() as stack:
        if port is not None:
            registry = CollectorRegistry()
            registry.register(collector)
            endpoint = serve_metrics(registry, bind, port, remedy="Choose a free port with --serve, and the address with --bind.")
            if endpoint is not None:
                stack.callback(endpoint.close)
            err.print(f"serving {LAG_OFFSETS}, {LAG_SECONDS} and {STATUS} on http://{bind}:{port}/metrics")
        live = stack.enter_context(Live(console=console, auto_refresh=False)) if watch else None
        while True:
            groups = await reader.snapshot(select)
            collector.groups = groups
            if live is not None:
                stamp = Text(f"{datetime.now(UTC):%H:%M:%S} UTC, every {interval:g}s; Ctrl-C to stop", style="dim")
                live.update(Stack(stamp, lag_view(groups, namespace, all_groups)), refresh=True)
            await asyncio.sleep(interval)

