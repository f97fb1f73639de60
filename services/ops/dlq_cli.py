"""`switchboard dlq`: see which messages failed and why, and redrive them once the cause is fixed."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from schemas.topics import Topics
from services.ops import dlq, redrive
from services.ops.dlq import DeadLetter, Selection
from services.ops.dlq_views import (
    plan_table,
    record_json,
    records_table,
    redrive_json,
    redrive_summary,
    show_record,
    show_stats,
    stats_json,
)
from services.ops.redrive import RedriveInterrupted, RedriveReport
from services.ops.terminal import (
    TenantOption,
    command,
    console,
    echo_json,
    err,
    reader_settings,
    run_async,
)
from services.runtime.host import Settings

if TYPE_CHECKING:
    from schemas.envelope import Envelope

dlq_app = typer.Typer(
    help=(
        "Dead letters: see which messages failed and why, and redrive them once the cause is fixed.\n\n"
        "Every consumed topic T has a dead-letter topic T.dlq. A record there is the original message "
        "(key, value, headers) plus x-dlq-* headers saying where it came from and why it failed. "
        "Its ID is <dlq topic>:<partition>:<offset>, as `dlq list` prints it. "
        "Reads SWITCHBOARD_NAMESPACE, KAFKA_BOOTSTRAP_SERVERS and, for `show` and `redrive`, REDIS_URL."
    ),
    no_args_is_help=True,
)

# The reasons as choices, so that --help lists them and a wrong one is refused with the list.
Reason = Enum("Reason", {r: r for r in dlq.REASONS}, type=str)  # type: ignore[misc]

TopicSelector = Annotated[
    list[str] | None,
    typer.Option(
        "--topic", "-t",
        help="Only records of this topic: its dead-letter topic or the topic it belongs to, with or without "
        "the namespace (tools, agent.writer, goals.dlq). Repeatable.",
    ),
]
ReasonSelector = Annotated[
    list[Reason] | None,
    typer.Option("--reason", "-r", help="Only records dead-lettered for this reason. Repeatable."),
]
GoalSelector = Annotated[list[str] | None, typer.Option("--goal", "-g", help="Only records of this goal id. Repeatable.")]
SinceSelector = Annotated[
    str | None,
    typer.Option(help="Only records dead-lettered since then: a duration back from now (30m, 2h, 1d) or an ISO time "
                 "(2025-05-01T12:00:00Z; UTC unless it names its zone)."),
]
UntilSelector = Annotated[str | None, typer.Option(help="Only records dead-lettered before then (same forms as --since).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]


def _selection(
    topics: Topics, topic: list[str] | None, reason: list[Any] | None, goal: list[str] | None,
    since: str | None, until: str | None, ids: list[str] | None = None,
) -> Selection:
    now = datetime.now(UTC)

    def parsed(option: str, parse: Any, values: list[str]) -> list[Any]:
        try:
            return [parse(v) for v in values]
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from exc

    for rid in ids or []:
        [(dlq_topic, _, _)] = parsed("--id", dlq.parse_record_id, [rid])
        if dlq_topic not in topics.dlq_topics():
            raise typer.BadParameter(f"{rid}: {dlq_topic} is not a dead-letter topic of namespace {topics.namespace!r}", param_hint="--id")
    return Selection(
        dlq_topics=frozenset(parsed("--topic", lambda t: dlq.resolve_dlq_topic(t, topics), topic or [])),
        reasons=frozenset(r.value for r in reason or []),
        goals=frozenset(goal or []),
        ids=frozenset(i.strip() for i in ids or []),
        since=parsed("--since", lambda w: dlq.parse_when(w, now), [since])[0] if since else None,
        until=parsed("--until", lambda w: dlq.parse_when(w, now), [until])[0] if until else None,
    )


@command(dlq_app, "list")
def dlq_list(
    topic: TopicSelector = None,
    reason: ReasonSelector = None,
    goal: GoalSelector = None,
    since: SinceSelector = None,
    until: UntilSelector = None,
    limit: Annotated[int, typer.Option(min=0, help="Show at most the newest N matching records (0: all).")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List dead-letter records, oldest first: ID, when, original topic, reason, goal, exception, attempts.

    Reads every dead-letter topic of the namespace from the beginning to its current end, outside
    any consumer group (it moves no one's offsets). Records a redrive has already republished are
    marked "redriven". Exits 0, also when nothing matches; 2 on a bad option or unreachable Kafka.
    """
    settings, topics = reader_settings()
    selection = _selection(topics, topic, reason, goal, since, until)

    async def main() -> int:
        records = await dlq.select(settings.kafka, topics, selection)
        redriven = await redrive.read_redriven(settings.kafka, topics)
        shown = records[-limit:] if limit else records
        if as_json:
            echo_json([r.summary() | {"redriven": r.id in redriven} for r in shown])
            return 0
        if not records:
            console.print(f"no dead letters in namespace {escape(topics.namespace)} match")
            return 0
        more = f", the newest {len(shown)} shown (--limit)" if len(shown) < len(records) else ""
        console.print(records_table(topics, shown, redriven, f"{len(records)} dead letter(s){more}"))
        return 0

    raise typer.Exit(run_async(main()))


@command(dlq_app, "show")
def dlq_show(
    record_id: Annotated[str, typer.Argument(metavar="ID", help="<dlq topic>:<partition>:<offset>, as `dlq list` prints it.")],
    steps: Annotated[int, typer.Option(min=0, help="How many of the goal's last timeline entries to show.")] = 10,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one dead-letter record in full (key, value, every header) and its goal's last steps.

    The steps are the newest entries of the goal's timeline in Redis, as the memory service recorded
    them; they need REDIS_URL (without it, only the record is shown). The tenant is the record's
    own; --tenant is used only for a message that does not say.
    Exits 0; 1 when the record does not exist (any more); 2 on a malformed ID or unreachable Kafka.
    """
    settings, topics = reader_settings()
    try:
        dlq.parse_record_id(record_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="ID") from exc

    async def main() -> int:
        record = await dlq.fetch(settings.kafka, record_id)
        if record is None:
            err.print(f"[red]no record {escape(record_id)}: the partition does not hold that offset (never, or no longer)[/]")
            return 1
        who = record.tenant or tenant or settings.platform.tenant
        timeline: list[Envelope] | None = None
        if settings.redis.url and record.goal_id:
            from redis.asyncio import Redis

            from memory.keys import RedisKeys

            redis = Redis.from_url(settings.redis.url)
            try:
                timeline = await dlq.last_steps(redis, RedisKeys(topics.namespace), who, record.goal_id, steps)
            finally:
                await redis.aclose()
        if as_json:
            echo_json(record_json(record, timeline))
        else:
            show_record(topics, record, timeline, redis_configured=bool(settings.redis.url))
        return 0

    raise typer.Exit(run_async(main()))


@command(dlq_app, "stats")
def dlq_stats(
    window: Annotated[str, typer.Option(help="How far back growth is counted: 30m, 1h, 1d ...")] = "1h",
    as_json: JsonOption = False,
) -> None:
    """How many dead letters each topic and each reason has, and how fast they are growing.

    Depth is what each dead-letter topic holds now; growth is how many records were added within
    --window, and that rate per hour. A depth that keeps growing means something keeps failing.
    """
    settings, topics = reader_settings()
    try:
        span = dlq.parse_duration(window)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--window") from exc

    async def main() -> int:
        records = await dlq.select(settings.kafka, topics, dlq.Selection())
        stats = dlq.tally(records, topics.dlq_topics(), span, datetime.now(UTC))
        if as_json:
            echo_json(stats_json(stats))
        else:
            show_stats(topics, stats, window)
        return 0

    raise typer.Exit(run_async(main()))


@command(dlq_app, "redrive")
def dlq_redrive(
    topic: TopicSelector = None,
    reason: ReasonSelector = None,
    goal: GoalSelector = None,
    record_ids: Annotated[list[str] | None, typer.Option("--id", help="This record (as `dlq list` prints it). Repeatable.")] = None,
    since: SinceSelector = None,
    until: UntilSelector = None,
    everything: Annotated[bool, typer.Option("--all", help="Redrive every dead letter of the namespace (needed when no other selector is given).")] = False,
    again: Annotated[bool, typer.Option("--again", help="Also redrive records that were redriven before.")] = False,
    rate: Annotated[float, typer.Option(min=0.01, help="At most this many records per second.")] = 10.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be redriven; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    actor: Annotated[str | None, typer.Option(help="Who the audit trail names (default: $USER@hostname).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Send selected dead letters back to their original topic, once what made them fail is fixed.

    Each record is republished to the topic it was consumed from (x-dlq-original-topic) with the
    same key and value, so the event keeps its id, and with its original headers minus every
    x-dlq-*, x-attempt, x-retry-* and x-origin-* header (its attempts count from 1 again), plus
    x-redriven-from: ID. Before a goal's first record, the goal is reopened: its budget may run
    again and the orchestrator resumes its parked tasks. The work continues from its checkpoints,
    and a side effect that already happened does not happen again (idempotency keys). Each record
    redriven gets an audit record (action dlq.redrive) on the audit topic; records redriven before
    are skipped unless --again. A message that does not decode (poison) is republished without a
    reopen, and will most likely be dead-lettered again. Records stay in their dead-letter topic.

    Exits 0 when every selected record was redriven (or none matched); 1 when it stopped part-way
    (the summary says which were redriven); 2 on a bad option, no selector, or no --yes without a terminal.
    """
    settings, topics = reader_settings()
    selection = _selection(topics, topic, reason, goal, since, until, record_ids)
    if not selection.narrows and not everything:
        err.print(
            "[red]refusing to redrive every dead letter of the namespace: choose records with --reason, --goal, "
            "--topic, --id, --since or --until, or pass --all[/]"
        )
        raise typer.Exit(2)
    who = actor or redrive.default_actor()

    async def main() -> int:
        records = await dlq.select(settings.kafka, topics, selection)
        missing = sorted(selection.ids - {r.id for r in records})
        if missing:
            err.print(f"[red]no such record(s): {escape(', '.join(missing))} (or they do not match the other selectors)[/]")
            return 1
        plan = redrive.plan_redrive(records, await redrive.read_redriven(settings.kafka, topics), again)
        if plan.skipped:
            err.print(f"[dim]skipping {len(plan.skipped)} record(s) redriven before (--again to redrive them too)[/]")
        if plan.undecodable:
            err.print(
                f"[yellow]warning: {len(plan.undecodable)} record(s) do not decode as events (poison): they are "
                "republished without reopening a goal, and will most likely be dead-lettered again[/]"
            )
        if not plan.records or dry_run:
            if as_json:
                echo_json(redrive_json(plan, RedriveReport(), dry_run, interrupted=None))
            elif not plan.records:
                console.print("nothing to redrive")
            else:
                console.print(plan_table(topics, plan.records, "would redrive"))
                if plan.goals:
                    console.print("would reopen goal(s): " + escape(", ".join(g for _, g in plan.goals)))
                console.print("[bold]dry run: nothing was changed[/]")
            return 0
        if plan.goals and not settings.redis.url:
            err.print("[red]REDIS_URL is not set: a redrive needs Redis to reopen the goals of these records[/]")
            return 2
        if not yes:
            if not sys.stdin.isatty():
                err.print(f"[red]{len(plan.records)} record(s) selected; add --yes to redrive them without a terminal to confirm on[/]")
                return 2
            console.print(plan_table(topics, plan.records, "to redrive"))
            if not typer.confirm(f"Redrive {len(plan.records)} record(s) and reopen {len(plan.goals)} goal(s)?"):
                return 1
        report, interrupted = await _run_redrive(settings, topics, plan.records, who, rate)
        if as_json:
            echo_json(redrive_json(plan, report, False, interrupted))
        else:
            redrive_summary(report, len(plan.records), interrupted)
        return 1 if interrupted else 0

    raise typer.Exit(run_async(main()))


async def _run_redrive(
    settings: Settings, topics: Topics, todo: list[DeadLetter], actor: str, rate: float
) -> tuple[RedriveReport, RedriveInterrupted | None]:
    from redis.asyncio import Redis
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from memory.keys import RedisKeys
    from services.runtime.kafka_bus import RecordSender
    from services.runtime.budget import BudgetLedger
    from services.runtime.kafka_bus import ensure_topics

    await ensure_topics(settings.kafka, [topics.audit, topics.goals], settings.platform.partitions)
    redis = Redis.from_url(settings.redis.url) if settings.redis.url else None
    progress = Progress(
        TextColumn("redriving"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True,
    )
    try:
        async with RecordSender(settings.kafka) as sender:
            deps = redrive.RedriveDeps(
                producer=sender, topics=topics, actor=actor,
                budget=BudgetLedger(redis, RedisKeys(topics.namespace), settings.budget) if redis else None,
                default_tenant=settings.platform.tenant, pace=redrive.Pace(rate),
            )
            with progress:
                bar = progress.add_task("redrive", total=len(todo))
                try:
                    return await redrive.redrive(deps, todo, done=lambda _: progress.advance(bar)), None
                except redrive.RedriveInterrupted as exc:
                    return exc.report, exc
    finally:
        if redis is not None:
            await redis.aclose()
