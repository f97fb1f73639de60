"""`switchboard audit`: which entries a query selects, and how they are shown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord

from schemas.events import AuditRecorded, GoalSubmitted
from services.ops.audit_cli import AuditEntry, AuditQuery, detail_text

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def entry(offset: int, action: str, actor: str, goal: str, minutes_ago: float) -> AuditEntry:
    event = AuditRecorded(
        tenant="acme", goal_id=goal, action=action, actor=actor, subject=f"c{offset}",
        detail={"tool": "calculator"}, ts=NOW - timedelta(minutes=minutes_ago),
    )
    return AuditEntry(0, offset, event)


ENTRIES = [
    entry(0, "tool.executed", "researcher", "g1", 90),
    entry(1, "tool.denied", "writer", "g1", 50),
    entry(2, "dlq.redrive", "ops@host", "g2", 30),
    entry(3, "tool.denied", "unknown", "g2", 10),
    entry(4, "tool.executed", "writer", "g3", 5),
]


def offsets(query: AuditQuery) -> list[int]:
    return [e.offset for e in query.select(ENTRIES)]


def test_no_criterion_selects_everything_oldest_first() -> None:
    assert offsets(AuditQuery()) == [0, 1, 2, 3, 4]
    assert offsets(AuditQuery()) == [e.offset for e in AuditQuery().select(reversed(ENTRIES))]


def test_each_criterion_narrows_and_all_must_match() -> None:
    assert offsets(AuditQuery(actions=frozenset({"tool.denied"}))) == [1, 3]
    assert offsets(AuditQuery(actions=frozenset({"tool.denied", "dlq.redrive"}))) == [1, 2, 3]
    assert offsets(AuditQuery(actors=frozenset({"writer"}))) == [1, 4]
    assert offsets(AuditQuery(goals=frozenset({"g2"}))) == [2, 3]
    assert offsets(AuditQuery(since=NOW - timedelta(minutes=40))) == [2, 3, 4]
    assert offsets(AuditQuery(actions=frozenset({"tool.denied"}), goals=frozenset({"g1"}))) == [1]
    assert offsets(AuditQuery(actors=frozenset({"nobody"}))) == []


def test_the_limit_keeps_the_newest() -> None:
    assert offsets(AuditQuery(limit=2)) == [3, 4]
    assert offsets(AuditQuery(actions=frozenset({"tool.executed"}), limit=1)) == [4]
    assert offsets(AuditQuery(limit=0)) == [0, 1, 2, 3, 4]


def record(value: bytes, offset: int = 7) -> ConsumerRecord:
    return ConsumerRecord("sb.audit", 2, offset, 0, 0, b"g1", value, None, 0, len(value), [])


def test_only_audit_events_become_entries() -> None:
    event = ENTRIES[1].event
    found = AuditEntry.from_record(record(event.to_bytes()))
    assert found is not None and found.event == event and (found.partition, found.offset) == (2, 7)
    assert AuditEntry.from_record(record(b"not json")) is None
    assert AuditEntry.from_record(record(GoalSubmitted(tenant="acme", goal_id="g1", text="x").to_bytes())) is None
    summary = found.summary()
    assert summary["action"] == "tool.denied" and summary["actor"] == "writer" and summary["goal_id"] == "g1"
    assert summary["detail"] == {"tool": "calculator"} and summary["ts"] == event.ts.isoformat()


def test_detail_is_one_short_line() -> None:
    assert detail_text({"tool": "calculator", "ok": True, "error": None, "task": ""}) == "tool=calculator ok=True"
    assert len(detail_text({"error": "x" * 500}, limit=40)) == 40
