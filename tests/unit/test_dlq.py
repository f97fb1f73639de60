"""The dead-letter tools' decisions on plain records: which records a selection means, how they are
counted, what a redrive would send (and skip), with which headers, and how fast."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import AuditRecorded, GoalSubmitted, decode_event
from schemas.topics import Topics
from services.ops.dlq import (
    DeadLetter,
    Selection,
    parse_duration,
    parse_record_id,
    parse_when,
    resolve_dlq_topic,
    tally,
)
from services.ops.redrive import (
    Pace,
    RedriveDeps,
    RedriveInterrupted,
    plan_redrive,
    redrive,
    redrive_headers,
    redriven_ids,
)

TOPICS = Topics("sb", ("researcher", "writer"))
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def dead_letter(
    offset: int = 0, *, topic: str = "sb.tools", reason: str = "tool_failed", goal: str | None = "g-1",
    tenant: str = "acme", at: datetime = NOW, headers: Mapping[str, str] | None = None, value: bytes | None = None,
) -> DeadLetter:
    """A record of `topic`'s dead-letter topic as the pipeline writes it: the event, plus x-dlq-* headers."""
    if value is None:
        value = GoalSubmitted(tenant=tenant, goal_id=goal or "g-none", text="what is 6*7").to_bytes()
    written = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "event_type": "goal.submitted",
        "x-dlq-reason": reason,
        "x-dlq-original-topic": topic,
        "x-dlq-attempts": "3",
        **({"x-dlq-goal-id": goal} if goal else {}),
        **(headers or {}),
    }
    return DeadLetter(Topics.dlq(topic), 0, offset, int(at.timestamp() * 1000), b"key-1", value, written)


POISON = b"\xff\xfe not json"


# --- when, how long, which record ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7_200), ("1h30m", 5_400), ("1.5h", 5_400), ("2d", 172_800), ("1w", 604_800), (" 15 M ", 900)],
)
def test_a_duration_reads_as_its_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "h", "2x", "1h and then some", "-1h", "0m"])
def test_what_is_not_a_positive_duration_is_refused_with_the_forms_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_when_is_a_duration_back_from_now_or_an_iso_time_in_utc_unless_it_names_its_zone() -> None:
    assert parse_when("2h", NOW) == datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_when("2025-04-30T08:15:00Z", NOW) == datetime(2025, 4, 30, 8, 15, tzinfo=UTC)
    assert parse_when("2025-04-30T08:15:00", NOW) == datetime(2025, 4, 30, 8, 15, tzinfo=UTC)
    in_paris = parse_when("2025-04-30T10:15:00+02:00", NOW)
    assert in_paris.utcoffset() == timedelta(hours=2) and in_paris == datetime(2025, 4, 30, 8, 15, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a duration .* nor an ISO time"):
        parse_when("yesterday", NOW)


def test_a_record_id_is_its_dead_letter_topic_partition_and_offset() -> None:
    assert parse_record_id(" sb.agent.writer.dlq:2:17 ") == ("sb.agent.writer.dlq", 2, 17)
    assert dead_letter(17, topic="sb.agent.writer").id == "sb.agent.writer.dlq:0:17"
    for wrong in ("sb.tools:2:17", "sb.tools.dlq:2", "sb.tools.dlq:x:17", "sb.tools.dlq:2:-1", ""):
        with pytest.raises(ValueError, match="not a dead-letter record ID"):
            parse_record_id(wrong)


@pytest.mark.parametrize(
    ("name", "meant"),
    [("tools", "sb.tools.dlq"), ("agent.writer", "sb.agent.writer.dlq"), ("goals.dlq", "sb.goals.dlq"),
     ("sb.goals.dlq", "sb.goals.dlq"), ("sb.memory", "sb.memory.dlq")],
)
def test_a_topic_is_named_by_its_dead_letter_topic_or_its_own_name_with_or_without_the_namespace(name: str, meant: str) -> None:
    assert resolve_dlq_topic(name, TOPICS) == meant


def test_an_unknown_topic_is_refused_with_the_namespaces_topics() -> None:
    with pytest.raises(ValueError, match="no dead-letter topic 'nowhere'") as refused:
        resolve_dlq_topic("nowhere", TOPICS)
    assert "agent.writer" in str(refused.value) and "tools" in str(refused.value)
    with pytest.raises(ValueError):
        resolve_dlq_topic("other.tools", TOPICS)  # another namespace's


# --- what a dead letter says ---------------------------------------------------------------------


def test_a_dead_letter_reads_its_headers_and_its_event() -> None:
    record = dead_letter(
        5, headers={"x-dlq-exception-class": "ToolFailed", "x-dlq-exception-message": "disk full", "x-dlq-original-offset": "41"},
    )
    assert (record.reason, record.original_topic, record.goal_id, record.attempts) == ("tool_failed", "sb.tools", "g-1", 3)
    assert record.exception == "ToolFailed: disk full"
    assert record.dead_lettered_at == NOW
    assert record.event is not None and record.tenant == "acme"
    summary = record.summary()
    assert (summary["id"], summary["original_offset"], summary["event_type"]) == ("sb.tools.dlq:0:5", 41, "goal.submitted")


def test_a_poison_record_has_no_event_and_falls_back_on_its_dead_letter_topic() -> None:
    record = DeadLetter("sb.goals.dlq", 1, 3, 0, None, POISON, {"x-dlq-reason": "poison"})
    assert record.event is None and record.tenant is None and record.goal_id == ""
    assert record.original_topic == "sb.goals" and record.attempts == 1
    schema_invalid = DeadLetter("sb.goals.dlq", 1, 4, 0, None, b'{"tenant": "acme", "goal_id": 7}', {})
    assert schema_invalid.event is None and schema_invalid.tenant == "acme"


# --- selection and counts ------------------------------------------------------------------------


def test_a_selection_keeps_the_records_that_match_every_criterion_it_was_given() -> None:
    old = dead_letter(0, topic="sb.tools", reason="tool_denied", goal="g-1", at=NOW - timedelta(days=2))
    denied = dead_letter(1, topic="sb.tools", reason="tool_denied", goal="g-2", at=NOW - timedelta(minutes=5))
    writer = dead_letter(0, topic="sb.agent.writer", reason="budget_exceeded", goal="g-2", at=NOW - timedelta(minutes=1))
    records = [old, denied, writer]

    def chosen(selection: Selection) -> list[DeadLetter]:
        return [r for r in records if selection.matches(r)]

    assert chosen(Selection()) == records and not Selection().narrows
    assert chosen(Selection(reasons=frozenset({"tool_denied"}))) == [old, denied]
    assert chosen(Selection(goals=frozenset({"g-2"}), dlq_topics=frozenset({"sb.tools.dlq"}))) == [denied]
    assert chosen(Selection(since=NOW - timedelta(hours=1))) == [denied, writer]
    assert chosen(Selection(until=NOW - timedelta(minutes=1))) == [old, denied], "until excludes its own moment"
    assert chosen(Selection(ids=frozenset({writer.id}))) == [writer]
    assert Selection(ids=frozenset({writer.id})).narrows


def test_a_selection_reads_only_the_dead_letter_topics_it_can_match() -> None:
    assert Selection().topics_to_read(TOPICS) == TOPICS.dlq_topics()
    assert Selection(dlq_topics=frozenset({"sb.tools.dlq"})).topics_to_read(TOPICS) == ["sb.tools.dlq"]
    by_id = Selection(ids=frozenset({"sb.agent.writer.dlq:0:3", "sb.goals.dlq:1:0"}))
    assert sorted(by_id.topics_to_read(TOPICS)) == ["sb.agent.writer.dlq", "sb.goals.dlq"]


def test_stats_count_depth_and_growth_per_topic_and_per_reason_and_list_empty_topics_too() -> None:
    records = [
        dead_letter(0, topic="sb.tools", reason="tool_failed", at=NOW - timedelta(hours=3)),
        dead_letter(1, topic="sb.tools", reason="tool_failed", at=NOW - timedelta(minutes=10)),
        dead_letter(0, topic="sb.goals", reason="poison", at=NOW - timedelta(minutes=20)),
        dead_letter(2, topic="sb.tools", reason="", at=NOW - timedelta(days=1)),
    ]
    stats = tally(records, TOPICS.dlq_topics(), timedelta(minutes=30), NOW)
    assert (stats.depth, stats.recent) == (4, 2)
    assert stats.per_hour(stats.recent) == 4.0  # 2 in half an hour
    assert set(stats.by_topic) == set(TOPICS.dlq_topics())
    assert (stats.by_topic["sb.tools.dlq"].depth, stats.by_topic["sb.tools.dlq"].recent) == (3, 1)
    assert stats.by_topic["sb.memory.dlq"].depth == 0
    assert {k: (t.depth, t.recent) for k, t in stats.by_reason.items()} == {"tool_failed": (2, 1), "poison": (1, 1), "(none)": (1, 0)}
    assert next(iter(stats.by_reason)) == "tool_failed", "the deepest reason first"


# --- the redrive ---------------------------------------------------------------------------------


def audit(subject: str, action: str = "dlq.redrive", dry_run: bool = False) -> bytes:
    entry = AuditRecorded(
        tenant="acme", goal_id="g-1", action=action, actor="ops@test", subject=subject, detail={"dry_run": dry_run},
    )
    return entry.to_bytes()


def test_the_audit_trail_says_which_records_were_redriven() -> None:
    trail = [
        audit("sb.tools.dlq:0:1"),
        audit("sb.tools.dlq:0:2", dry_run=True),
        audit("sb.tools.dlq:0:3", action="tool.denied"),
        POISON,
        GoalSubmitted(tenant="acme", goal_id="g-1", text="not an audit").to_bytes(),
    ]
    assert redriven_ids(trail) == {"sb.tools.dlq:0:1"}


def test_a_redrive_plan_skips_what_was_redriven_before_unless_asked_again() -> None:
    first, second, poison = dead_letter(1, goal="g-1"), dead_letter(2, goal="g-2"), dead_letter(3, goal=None, value=POISON)
    again_first = dead_letter(4, goal="g-1")
    selected = [first, second, poison, again_first]

    plan = plan_redrive(selected, {second.id}, again=False)
    assert plan.records == [first, poison, again_first] and plan.skipped == [second]
    assert plan.goals == [("acme", "g-1")], "each goal once; poison reopens none"
    assert plan.undecodable == [poison]

    everything = plan_redrive(selected, {second.id}, again=True)
    assert everything.records == selected and everything.skipped == []
    assert everything.goals == [("acme", "g-1"), ("acme", "g-2")]


def test_a_redriven_message_loses_what_its_failed_attempts_added_and_names_its_dead_letter() -> None:
    record = dead_letter(
        9,
        headers={
            "x-attempt": "4", "x-retry-due-ms": "1714564800000", "x-retry-group": "sb.tools",
            "x-origin-topic": "sb.tools.retry.2", "x-origin-offset": "12", "x-redriven-from": "sb.tools.dlq:0:1",
            "x-tenant-note": "kept",
        },
    )
    headers = redrive_headers(record)
    assert headers == {
        "traceparent": record.headers["traceparent"],
        "event_type": "goal.submitted",
        "x-tenant-note": "kept",
        "x-redriven-from": "sb.tools.dlq:0:9",
    }
    assert record.headers["x-dlq-reason"] == "tool_failed", "the dead letter itself is left as it was"


class FakeClock:
    """Time that passes only when the pace sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_the_pace_spaces_records_one_interval_apart_and_does_not_wait_for_time_already_passed() -> None:
    clock = FakeClock()
    pace = Pace(4.0, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        await pace.wait()
    assert clock.slept == [0.25, 0.25], "the first goes at once, then one every 1/rate seconds"
    assert clock.now == 100.5
    clock.now += 2.0  # a slow send: the next one is already due
    await pace.wait()
    await pace.wait()
    assert clock.slept == [0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="positive"):
        Pace(0)


class RecordingProducer:
    """Takes sends like the Kafka producer; the `fail_on`-th send raises."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, dict[str, str]]] = []
        self.fail_on = fail_on

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]) -> None:
        if self.fail_on is not None and len(self.sent) + 1 == self.fail_on:
            raise ConnectionError("broker went away")
        self.sent.append((topic, key, value, dict(headers)))


def poison(offset: int) -> DeadLetter:
    return DeadLetter("sb.goals.dlq", 0, offset, 0, b"k", POISON, {"x-dlq-reason": "poison", "x-attempt": "1"})


def deps(producer: RecordingProducer, clock: FakeClock) -> RedriveDeps:
    return RedriveDeps(
        producer=producer, topics=TOPICS, actor="ops@test", budget=None, default_tenant="acme",
        pace=Pace(10.0, clock=clock, sleep=clock.sleep),
    )


async def test_a_redrive_republishes_each_record_as_it_was_and_audits_it() -> None:
    producer, clock = RecordingProducer(), FakeClock()
    records = [poison(0), poison(1)]
    report = await redrive(deps(producer, clock), records)
    assert report.redriven == records and report.reopened == []
    republished = [s for s in producer.sent if s[0] == "sb.goals"]
    assert [(key, value, headers["x-redriven-from"]) for _, key, value, headers in republished] == [
        (b"k", POISON, "sb.goals.dlq:0:0"), (b"k", POISON, "sb.goals.dlq:0:1"),
    ]
    audits = [decode_event(value) for topic, _, value, _ in producer.sent if topic == "sb.audit"]
    assert [(a.action, a.subject, a.tenant) for a in audits if isinstance(a, AuditRecorded)] == [
        ("dlq.redrive", "sb.goals.dlq:0:0", "acme"), ("dlq.redrive", "sb.goals.dlq:0:1", "acme"),
    ]
    assert clock.slept == [pytest.approx(0.1)], "paced at --rate"


async def test_a_redrive_that_fails_part_way_says_which_records_it_redrove() -> None:
    producer = RecordingProducer(fail_on=3)  # record 1, its audit, then record 2 fails
    records = [poison(0), poison(1), poison(2)]
    with pytest.raises(RedriveInterrupted, match="could not redrive sb.goals.dlq:0:1: ConnectionError") as stopped:
        await redrive(deps(producer, FakeClock()), records)
    assert stopped.value.record == records[1]
    assert stopped.value.report.redriven == [records[0]]

