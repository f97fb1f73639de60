"""`switchboard audit`: query the append-only audit trail (`<namespace>.audit`): tool executions and
denials, redrives, and who or what asked for them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from aiokafka import ConsumerRecord
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from schemas.events import AuditRecorded, decode_event
from schemas.topics import Topics
from services.ops.kafka_client import read_to_end
from services.ops.terminal import (
    console,
    echo_json,
    parse_when,
    reader_settings,
    run_async,
)
from services.runtime.host import Settings


@dataclass(frozen=True)
class AuditEntry:
    """One record of the audit topic, and where it is."""

    partition: int
    offset: int
    event: AuditRecorded

    @classmethod
    def from_record(cls, record: ConsumerRecord) -> AuditEntry | None:
        """None for a record that is not an audit event (the topic is append-only, not checked)."""
        try:
            event = decode_event(record.value or b"")
        except (ValidationError, ValueError):
            return None
        return cls(record.partition, record.offset, event) if isinstance(event, AuditRecorded) else None

    def summary(self) -> dict[str, Any]:
        e = self.event
        return {
            "ts": e.ts.isoformat(),
            "action": e.action,
            "actor": e.actor,
            "subject": e.subject,
            "tenant": e.tenant,
            "goal_id": e.goal_id,
            "task_id": e.task_id,
            "detail": e.detail,
            "event_id": e.event_id,
            "partition": self.partition,
            "offset": self.offset,
        }


@dataclass(frozen=True)
class AuditQuery:
    """Which entries to show: every criterion given must match; none given, all do."""

    actions: frozenset[str] = frozenset()
    actors: frozenset[str] = frozenset()
    goals: frozenset[str] = frozenset()
    since: datetime | None = None
    limit: int = 0
    """The newest N matching entries (0: all)."""

    def matches(self, event: AuditRecorded) -> bool:
        return (
            (not self.actions or event.action in self.actions)
            and (not self.actors or event.actor in self.actors)
            and (not self.goals or event.goal_id in self.goals)
            and (self.since is None or event.ts >= self.since)
        )

    def select(self, entries: Iterable[AuditEntry]) -> list[AuditEntry]:
        """The matching entries, oldest first (by event time: partitions interleave), the newest `limit`."""
        found = sorted((e for e in entries if self.matches(e.event)), key=lambda e: (e.event.ts, e.partition, e.offset))
        return found[-self.limit:] if self.limit else found


def detail_text(detail: dict[str, Any], limit: int = 100) -> str:
    """`key=value` pairs on one line, for the table."""
    flat = " ".join(f"{k}={v}" for k, v in detail.items() if v not in (None, ""))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def entries_table(entries: list[AuditEntry], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("when (UTC)", "action", "actor", "subject", "goal", "detail"):
        table.add_column(name, overflow="fold")
    for entry in entries:
        e = entry.event
        table.add_row(
            e.ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), escape(e.action), escape(e.actor), escape(e.subject),
            escape(e.goal_id), escape(detail_text(e.detail)),
        )
    return table


async def read_audit(settings: Settings, topics: Topics) -> list[AuditEntry]:
    """Every audit event, from the beginning of the topic to its end when the read started."""
    records = await read_to_end(settings.kafka, [topics.audit])
    return [entry for entry in map(AuditEntry.from_record, records) if entry is not None]


def audit(
    action: Annotated[list[str] | None, typer.Option("--action", "-a", help="Only this action (tool.executed, tool.denied, dlq.redrive ...). Repeatable.")] = None,
    actor: Annotated[list[str] | None, typer.Option(help="Only entries of this actor: an agent kind, or an operator (user@host). Repeatable.")] = None,
    goal: Annotated[list[str] | None, typer.Option("--goal", "-g", help="Only entries of this goal id. Repeatable.")] = None,
    since: Annotated[str | None, typer.Option(help="Only entries since then: a duration back from now (30m, 2h, 1d) or an ISO time (UTC unless it names its zone).")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Show at most the newest N matching entries (0: all).")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
) -> None:
    """Query the audit trail: every tool execution and denial, and every redrive, with who or what asked.

    Reads <namespace>.audit from the beginning to its current end, outside any consumer group (it
    moves no one's offsets), oldest first. Exits 0, also when nothing matches; 2 on a bad option or
    unreachable Kafka.
    """
    settings, topics = reader_settings()
    try:
        start = parse_when(since, datetime.now(UTC)) if since else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from exc
    query = AuditQuery(frozenset(action or []), frozenset(actor or []), frozenset(goal or []), start, limit)

    async def main() -> int:
        entries = await read_audit(settings, topics)
        matching = replace(query, limit=0).select(entries)
        shown = query.select(matching)
        if as_json:
            echo_json([e.summary() for e in shown])
            return 0
        if not shown:
            console.print(f"no audit entries in namespace {escape(topics.namespace)} match")
            return 0
        more = f", the newest {len(shown)} shown (--limit)" if len(shown) < len(matching) else ""
        console.print(entries_table(shown, f"{len(matching)} audit entr{'y' if len(matching) == 1 else 'ies'}{more}"))
        return 0

    raise typer.Exit(run_async(main()))
