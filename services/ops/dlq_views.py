"""What the `switchboard dlq` commands print: rich tables and panels for people, JSON for scripts."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from schemas.envelope import Envelope
from schemas.topics import Topics
from services.ops.dlq import DeadLetter, DlqStats
from services.ops.redrive import RedrivePlan, RedriveReport
from services.ops.terminal import console, err, short


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _local(topics: Topics, topic: str) -> str:
    return topic.removeprefix(f"{topics.namespace}.")


def records_table(topics: Topics, records: list[DeadLetter], redriven: set[str], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("ID", overflow="fold", style="bold")
    for name in ("dead-lettered (UTC)", "from topic", "reason", "goal", "exception"):
        table.add_column(name, overflow="fold")
    table.add_column("attempts", justify="right")
    for r in records:
        mark = " [green]↻ redriven[/]" if r.id in redriven else ""
        table.add_row(
            escape(r.id) + mark, _when(r.dead_lettered_at), escape(_local(topics, r.original_topic)),
            escape(r.reason), escape(r.goal_id or "-"), short(r.exception, 80), str(r.attempts),
        )
    return table


def _bytes_json(raw: bytes | None) -> tuple[Any, str]:
    if raw is None:
        return None, "none"
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        import base64

        return base64.b64encode(raw).decode(), "base64"
    try:
        return json.loads(text), "json"
    except ValueError:
        return text, "utf-8"


def record_json(record: DeadLetter, timeline: list[Envelope] | None) -> dict[str, Any]:
    key, key_encoding = _bytes_json(record.key)
    if key_encoding == "json":  # a key is an id, not a document, even when it parses as one
        key, key_encoding = (record.key or b"").decode(), "utf-8"
    value, value_encoding = _bytes_json(record.value)
    return record.summary() | {
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
        "headers": dict(record.headers),
        "timeline": None if timeline is None else [e.model_dump(mode="json") for e in timeline],
    }


def show_record(topics: Topics, record: DeadLetter, timeline: list[Envelope] | None, redis_configured: bool) -> None:
    from rich.json import JSON
    from rich.panel import Panel

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    original = f"{record.original_topic}[{record.headers.get('x-dlq-original-partition', '?')}]@{record.headers.get('x-dlq-original-offset', '?')}"
    event = record.event
    for name, value in (
        ("dead-lettered", f"{_when(record.dead_lettered_at)} UTC"),
        ("reason", record.reason),
        ("from", original),
        ("consumer group", record.headers.get("x-dlq-consumer-group", "")),
        ("exception", record.exception),
        ("attempts", str(record.attempts)),
        ("goal", f"{record.goal_id or '-'} (tenant {record.tenant or '?'})"),
        ("event", f"{event.event_type} {event.event_id}" if event else "does not decode as an event (poison)"),
        ("trace id", record.headers.get("x-dlq-trace-id", "") or "-"),
        ("key", "-" if record.key is None else str(_bytes_json(record.key)[0])),
    ):
        facts.add_row(name, escape(value))
    console.print(Panel(facts, title=escape(record.id), title_align="left"))
    value, encoding = _bytes_json(record.value)
    body = JSON.from_data(value) if encoding == "json" else escape(str(value))
    console.print(Panel(body, title=f"value ({encoding}, {len(record.value)} bytes)", title_align="left"))
    headers = Table(title="headers", title_justify="left")
    headers.add_column("name", style="bold")
    headers.add_column("value", overflow="fold")
    for name, text in record.headers.items():
        headers.add_row(escape(name), escape(text))
    console.print(headers)
    if not redis_configured:
        console.print("[yellow]REDIS_URL is not set: the goal's last steps (its timeline in Redis) are not shown[/]")
    elif timeline is not None:
        console.print(_timeline_table(record, timeline))


def _timeline_table(record: DeadLetter, timeline: list[Envelope]) -> Table:
    table = Table(title=f"last {len(timeline)} step(s) of goal {escape(record.goal_id)}", title_justify="left")
    for name in ("time (UTC)", "event", "task", "detail"):
        table.add_column(name, overflow="fold")
    for event in timeline:
        this = " [red]← this record[/]" if record.event and event.event_id == record.event.event_id else ""
        task = (event.task_id or "").rsplit(".", 1)[-1]
        table.add_row(_when(event.ts), escape(event.event_type) + this, escape(task), _gist(event))
    return table


def _gist(event: Any) -> str:
    """One line about an event: what a person looks for first."""
    for name in ("reason", "tool", "query", "result", "answer", "instruction", "text"):
        value = getattr(event, name, None)
        if isinstance(value, str) and value:
            detail = getattr(event, "detail", "") or getattr(event, "error", "") or ""
            return short(f"{name}: {value}" + (f" ({detail})" if detail else ""), 100)
    if getattr(event, "error", None):
        return short(f"error: {event.error}", 100)
    return ""


def stats_json(stats: DlqStats) -> dict[str, Any]:
    def tallies(by: dict[str, Any]) -> dict[str, Any]:
        return {k: {"depth": t.depth, "added": t.recent, "per_hour": stats.per_hour(t.recent)} for k, t in by.items()}

    return {
        "window_s": stats.window.total_seconds(),
        "depth": stats.depth,
        "added": stats.recent,
        "per_hour": stats.per_hour(stats.recent),
        "topics": tallies(stats.by_topic),
        "reasons": tallies(stats.by_reason),
    }


def show_stats(topics: Topics, stats: DlqStats, window: str) -> None:
    for title, by, name in (("dead-letter topics", stats.by_topic, "topic"), ("reasons", stats.by_reason, "reason")):
        table = Table(title=title, title_justify="left")
        table.add_column(name)
        table.add_column("depth", justify="right")
        table.add_column(f"added in {window}", justify="right")
        table.add_column("per hour", justify="right")
        for key, t in by.items():
            style = "red" if t.recent else ""
            table.add_row(escape(_local(topics, key)), str(t.depth), str(t.recent), f"{stats.per_hour(t.recent):.1f}", style=style)
        table.add_row("[bold]total[/]", str(stats.depth), str(stats.recent), f"{stats.per_hour(stats.recent):.1f}")
        console.print(table)


def plan_table(topics: Topics, records: list[DeadLetter], title: str) -> Table:
    table = Table(title=f"{title}: {len(records)} record(s)", title_justify="left")
    table.add_column("ID", overflow="fold", style="bold")
    for name in ("→ topic", "reason", "goal", "event"):
        table.add_column(name, overflow="fold")
    for r in records:
        event = f"{r.event.event_type} {r.event.event_id}" if r.event else "[yellow]not an event (does not decode)[/]"
        table.add_row(escape(r.id), escape(_local(topics, r.original_topic)), escape(r.reason), escape(r.goal_id or "-"), event)
    return table


def redrive_json(plan: RedrivePlan, report: RedriveReport, dry_run: bool, interrupted: Exception | None) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "selected": [r.id for r in plan.records],
        "redriven": [{"id": r.id, "topic": r.original_topic, "goal_id": r.goal_id} for r in report.redriven],
        "would_reopen" if dry_run else "reopened": [
            {"tenant": t, "goal_id": g} for t, g in (plan.goals if dry_run else report.reopened)
        ],
        "skipped_redriven_before": [r.id for r in plan.skipped],
        "undecodable": [r.id for r in plan.undecodable],
        "error": str(interrupted) if interrupted else None,
    }


def redrive_summary(report: RedriveReport, selected: int, interrupted: Exception | None) -> None:
    done = len(report.redriven)
    console.print(f"[green]redrove {done} of {selected} record(s)[/] to their original topics")
    if report.reopened:
        console.print("reopened goal(s): " + escape(", ".join(g for _, g in report.reopened)))
    poison = sum(1 for r in report.redriven if r.event is None)
    if poison:
        console.print(f"[yellow]{poison} poison record(s) republished without a goal[/]")
    if interrupted is not None:
        err.print(f"[red]stopped: {escape(str(interrupted))}. The records after it were not redriven; run the same "
                  "command again to redrive them (records already redriven are skipped).[/]")
