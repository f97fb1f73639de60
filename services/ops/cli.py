"""The `switchboard` command line."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
from datetime import UTC, datetime
from enum import Enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

import typer
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.events import GoalCompleted, GoalFailed, GoalSubmitted, decode_event
from schemas.topics import Topics
from services.runtime.bus import Delivery
from services.ops import dlq
from services.ops.dlq import DeadLetter, DlqStats, RedriveInterrupted, RedrivePlan, RedriveReport, Selection
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError, DeadLetterReason
from services.runtime.host import ServiceSpec, Settings, kafka_app, run_embedded
from services.runtime.tracecontext import new_traceparent

if TYPE_CHECKING:
    from schemas.envelope import Envelope

app = typer.Typer(
    help="Switchboard: an event-driven multi-agent platform on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
goal_app = typer.Typer(help="Submit goals to a running deployment and follow them.", no_args_is_help=True)
app.add_typer(goal_app, name="goal")
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
app.add_typer(dlq_app, name="dlq")

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

class Role(str, Enum):
    orchestrator = "orchestrator"
    agent = "agent"
    tools = "tools"
    memory = "memory"
    all = "all"

TenantOption = Annotated[str | None, typer.Option(help="Tenant the goal belongs to (default: $SWITCHBOARD_TENANT, else 'default').")]
TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for the goal to finish.")]


def _logging(settings: Settings, quiet: bool) -> None:
    level = logging.WARNING if quiet else getattr(logging, settings.platform.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("LiteLLM", "litellm", "httpx", "aiokafka", "LiteLLM Router"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _all_services(settings: Settings) -> list[ServiceSpec]:
    kinds = AgentCatalogue.load(settings.platform.agents_dir).names
    return [
        ServiceSpec("orchestrator"),
        *(ServiceSpec("agent", {"kind": k}) for k in kinds),
        ServiceSpec("tools"),
        ServiceSpec("memory"),
    ]


@app.command()
def run(
    goal: Annotated[str, typer.Argument(help="What you want done, in plain words.")],
    tenant: TenantOption = None,
    timeout: TimeoutOption = 120.0,
) -> None:
    """Run GOAL through every service in this process: no servers, no API key.

    Uses the embedded defaults: an in-process bus, in-process stores, Qdrant local mode under
    SWITCHBOARD_DATA_DIR, and the offline model (unless an agent's model says otherwise).
    Prints the plan, tasks, memory recalls and tool calls as they happen, then the answer.
    Exits 0 when the goal completes, 1 when it fails.
    """
    settings = Settings()
    _logging(settings, quiet=True)
    from services.ops.progress import ProgressView

    async def main() -> int:
        async with run_embedded(_all_services(settings), settings) as (bus, runtime):
            event = GoalSubmitted(tenant=tenant or settings.platform.tenant, goal_id=f"g-{new_id()}", text=goal)
            view = ProgressView(console, event.goal_id)
            finished = asyncio.Event()

            async def observe(delivery: Delivery) -> None:
                try:
                    shown = decode_event(delivery.value)
                except (ValidationError, ValueError):
                    return  # not an event (a dead letter's copy of a bad message): nothing to show
                view.show(shown)
                if isinstance(shown, GoalCompleted | GoalFailed):
                    finished.set()

            bus.observe(observe)
            headers = {"traceparent": new_traceparent(), "event_type": event.event_type}
            await bus.send(runtime.topics.goals, event.goal_id.encode(), event.to_bytes(), headers)
            try:
                async with asyncio.timeout(timeout):
                    await finished.wait()
            except TimeoutError:
                err.print(f"[red]goal {event.goal_id} did not finish within {timeout:.0f}s[/]")
                return 2
            if bus.failures:
                err.print(f"[red]{len(bus.failures)} message(s) could not be handled; see the log above[/]")
            return 0 if isinstance(view.outcome, GoalCompleted) else 1

    raise typer.Exit(_run_async(main()))


@app.command()
def serve(
    role: Annotated[Role, typer.Argument(help="Which role to run.", case_sensitive=False)],
    kind: Annotated[str | None, typer.Option(help="Agent kind, for the agent role (default: $AGENT_KIND, else researcher).")] = None,
    model: Annotated[str | None, typer.Option(help="LiteLLM model string overriding the agent kind's model.")] = None,
) -> None:
    """Run one role as a Kafka consumer group member until interrupted.

    Needs KAFKA_BOOTSTRAP_SERVERS and REDIS_URL (start local ones with `make infra-up`).
    Start as many replicas of a role as you like: they share its consumer group.
    `all` runs every role in this process (every agent kind).
    """
    settings = Settings()
    _logging(settings, quiet=False)
    if role is Role.all:
        specs = _all_services(settings)
    elif role is Role.agent:
        try:  # fail before connecting anywhere when the kind does not exist
            if kind:
                AgentCatalogue.load(settings.platform.agents_dir).get(kind)
        except ConfigurationError as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
        specs = [ServiceSpec("agent", {"kind": kind, "model": model})]
    else:
        specs = [ServiceSpec(role.value)]
    try:
        faststream_app = kafka_app(specs, settings)
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    raise typer.Exit(_run_async(faststream_app.run()) or 0)


@goal_app.command("submit")
def submit(
    text: Annotated[str, typer.Argument(help="The goal, in plain words.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print progress live and wait for the result.")] = False,
    tenant: TenantOption = None,
    timeout: TimeoutOption = 600.0,
) -> None:
    """Publish a goal to Kafka. Prints its id; with --follow, its progress and final answer.

    With --follow, exits 0 when the goal completes, 1 when it fails, 2 on timeout.
    """
    settings = Settings()
    _logging(settings, quiet=True)
    from services.ops.kafka_client import goal_events, goal_follower, publish
    from services.ops.progress import ProgressView
    from services.runtime.kafka_bus import ensure_topics

    topics = Topics(settings.platform.namespace, AgentCatalogue.load(settings.platform.agents_dir).names)
    event = GoalSubmitted(tenant=tenant or settings.platform.tenant, goal_id=f"g-{new_id()}", text=text)

    async def main() -> int:
        if not follow:
            await ensure_topics(settings.kafka, topics.all_topics(), settings.platform.partitions)
            await publish(settings.kafka, topics.goals, event, event.goal_id)
            console.print(event.goal_id)
            return 0
        view = ProgressView(console, event.goal_id)
        async with goal_follower(settings.kafka, topics, settings.platform.partitions) as consumer:
            await publish(settings.kafka, topics.goals, event, event.goal_id)
            try:
                async with asyncio.timeout(timeout):
                    async for shown in goal_events(consumer, event.goal_id):
                        view.show(shown)
                        if view.outcome is not None:
                            break
            except TimeoutError:
                err.print(f"[red]goal {event.goal_id} did not finish within {timeout:.0f}s[/]")
                return 2
        return 0 if isinstance(view.outcome, GoalCompleted) else 1

    raise typer.Exit(_run_async(main()))



# --- dlq -----------------------------------------------------------------------------------------

# The reasons as choices, so that --help lists them and a wrong one is refused with the list.
Reason = Enum("Reason", {r: r for r in get_args(DeadLetterReason)}, type=str)  # type: ignore[misc]
Command = TypeVar("Command", bound=Callable[..., None])


def _dlq_command(name: str) -> Callable[[Command], Command]:
    """Registers a dlq command with its docstring as help, re-flowed: rich help keeps the docstring's
    line breaks, which look broken at any terminal width but the source's."""

    def register(fn: Command) -> Command:
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        dlq_app.command(name, help="\n\n".join(" ".join(p.split()) for p in paragraphs))(fn)
        return fn

    return register
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


def _dlq_settings() -> tuple[Settings, Topics]:
    settings = Settings()
    _logging(settings, quiet=True)
    try:
        settings.kafka.require()
        topics = Topics(settings.platform.namespace, AgentCatalogue.load(settings.platform.agents_dir).names)
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    return settings, topics


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


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))  # not rich: it would wrap long lines


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _local(topics: Topics, topic: str) -> str:
    return topic.removeprefix(f"{topics.namespace}.")


def _short(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return escape(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _records_table(topics: Topics, records: list[DeadLetter], redriven: set[str], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("ID", overflow="fold", style="bold")
    for name in ("dead-lettered (UTC)", "from topic", "reason", "goal", "exception"):
        table.add_column(name, overflow="fold")
    table.add_column("attempts", justify="right")
    for r in records:
        mark = " [green]↻ redriven[/]" if r.id in redriven else ""
        table.add_row(
            escape(r.id) + mark, _when(r.dead_lettered_at), escape(_local(topics, r.original_topic)),
            escape(r.reason), escape(r.goal_id or "-"), _short(r.exception, 80), str(r.attempts),
        )
    return table


@_dlq_command("list")
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
    settings, topics = _dlq_settings()
    selection = _selection(topics, topic, reason, goal, since, until)

    async def main() -> int:
        records = await dlq.select(settings.kafka, topics, selection)
        redriven = await dlq.read_redriven(settings.kafka, topics)
        shown = records[-limit:] if limit else records
        if as_json:
            _echo_json([r.summary() | {"redriven": r.id in redriven} for r in shown])
            return 0
        if not records:
            console.print(f"no dead letters in namespace {escape(topics.namespace)} match")
            return 0
        more = f", the newest {len(shown)} shown (--limit)" if len(shown) < len(records) else ""
        console.print(_records_table(topics, shown, redriven, f"{len(records)} dead letter(s){more}"))
        return 0

    raise typer.Exit(_run_async(main()))


@_dlq_command("show")
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
    settings, topics = _dlq_settings()
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
            _echo_json(_record_json(record, timeline))
        else:
            _show_record(topics, record, timeline, redis_configured=bool(settings.redis.url))
        return 0

    raise typer.Exit(_run_async(main()))


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


def _record_json(record: DeadLetter, timeline: list[Envelope] | None) -> dict[str, Any]:
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


def _show_record(topics: Topics, record: DeadLetter, timeline: list[Envelope] | None, redis_configured: bool) -> None:
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
            return _short(f"{name}: {value}" + (f" ({detail})" if detail else ""), 100)
    if getattr(event, "error", None):
        return _short(f"error: {event.error}", 100)
    return ""


@_dlq_command("stats")
def dlq_stats(
    window: Annotated[str, typer.Option(help="How far back growth is counted: 30m, 1h, 1d ...")] = "1h",
    as_json: JsonOption = False,
) -> None:
    """How many dead letters each topic and each reason has, and how fast they are growing.

    Depth is what each dead-letter topic holds now; growth is how many records were added within
    --window, and that rate per hour. A depth that keeps growing means something keeps failing.
    """
    settings, topics = _dlq_settings()
    try:
        span = dlq.parse_duration(window)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--window") from exc

    async def main() -> int:
        records = await dlq.select(settings.kafka, topics, dlq.Selection())
        stats = dlq.tally(records, topics.dlq_topics(), span, datetime.now(UTC))
        if as_json:
            _echo_json(_stats_json(stats))
        else:
            _show_stats(topics, stats, window)
        return 0

    raise typer.Exit(_run_async(main()))


def _stats_json(stats: DlqStats) -> dict[str, Any]:
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


def _show_stats(topics: Topics, stats: DlqStats, window: str) -> None:
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


@_dlq_command("redrive")
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
    settings, topics = _dlq_settings()
    selection = _selection(topics, topic, reason, goal, since, until, record_ids)
    if not selection.narrows and not everything:
        err.print(
            "[red]refusing to redrive every dead letter of the namespace: choose records with --reason, --goal, "
            "--topic, --id, --since or --until, or pass --all[/]"
        )
        raise typer.Exit(2)
    who = actor or dlq.default_actor()

    async def main() -> int:
        records = await dlq.select(settings.kafka, topics, selection)
        missing = sorted(selection.ids - {r.id for r in records})
        if missing:
            err.print(f"[red]no such record(s): {escape(', '.join(missing))} (or they do not match the other selectors)[/]")
            return 1
        plan = dlq.plan_redrive(records, await dlq.read_redriven(settings.kafka, topics), again)
        if plan.skipped:
            err.print(f"[dim]skipping {len(plan.skipped)} record(s) redriven before (--again to redrive them too)[/]")
        if plan.undecodable:
            err.print(
                f"[yellow]warning: {len(plan.undecodable)} record(s) do not decode as events (poison): they are "
                "republished without reopening a goal, and will most likely be dead-lettered again[/]"
            )
        if not plan.records or dry_run:
            if as_json:
                _echo_json(_redrive_json(plan, RedriveReport(), dry_run, interrupted=None))
            elif not plan.records:
                console.print("nothing to redrive")
            else:
                console.print(_plan_table(topics, plan.records, "would redrive"))
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
            console.print(_plan_table(topics, plan.records, "to redrive"))
            if not typer.confirm(f"Redrive {len(plan.records)} record(s) and reopen {len(plan.goals)} goal(s)?"):
                return 1
        report, interrupted = await _redrive(settings, topics, plan.records, who, rate)
        if as_json:
            _echo_json(_redrive_json(plan, report, False, interrupted))
        else:
            _redrive_summary(report, len(plan.records), interrupted)
        return 1 if interrupted else 0

    raise typer.Exit(_run_async(main()))


async def _redrive(
    settings: Settings, topics: Topics, todo: list[DeadLetter], actor: str, rate: float
) -> tuple[RedriveReport, RedriveInterrupted | None]:
    from redis.asyncio import Redis
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from memory.keys import RedisKeys
    from services.ops.kafka_client import RecordSender
    from services.runtime.budget import BudgetLedger
    from services.runtime.kafka_bus import ensure_topics

    await ensure_topics(settings.kafka, [topics.audit, topics.goals], settings.platform.partitions)
    redis = Redis.from_url(settings.redis.url) if settings.redis.url else None
    progress = Progress(
        TextColumn("redriving"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True,
    )
    try:
        async with RecordSender(settings.kafka) as sender:
            deps = dlq.RedriveDeps(
                producer=sender, topics=topics, actor=actor,
                budget=BudgetLedger(redis, RedisKeys(topics.namespace), settings.budget) if redis else None,
                default_tenant=settings.platform.tenant, pace=dlq.Pace(rate),
            )
            with progress:
                bar = progress.add_task("redrive", total=len(todo))
                try:
                    return await dlq.redrive(deps, todo, done=lambda _: progress.advance(bar)), None
                except dlq.RedriveInterrupted as exc:
                    return exc.report, exc
    finally:
        if redis is not None:
            await redis.aclose()


def _plan_table(topics: Topics, records: list[DeadLetter], title: str) -> Table:
    table = Table(title=f"{title}: {len(records)} record(s)", title_justify="left")
    table.add_column("ID", overflow="fold", style="bold")
    for name in ("→ topic", "reason", "goal", "event"):
        table.add_column(name, overflow="fold")
    for r in records:
        event = f"{r.event.event_type} {r.event.event_id}" if r.event else "[yellow]not an event (does not decode)[/]"
        table.add_row(escape(r.id), escape(_local(topics, r.original_topic)), escape(r.reason), escape(r.goal_id or "-"), event)
    return table


def _redrive_json(plan: RedrivePlan, report: RedriveReport, dry_run: bool, interrupted: Exception | None) -> dict[str, Any]:
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


def _redrive_summary(report: RedriveReport, selected: int, interrupted: Exception | None) -> None:
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


def new_id() -> str:
    from schemas.envelope import new_id as _new

    return _new()[:12]


def _run_async(coro: object) -> int:
    try:
        result = asyncio.run(coro)  # type: ignore[arg-type]
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/]")
        return 2
    except KafkaConnectionError as exc:
        err.print(f"[red]cannot reach Kafka: {exc}. Is it running (`make infra-up`), and is KAFKA_BOOTSTRAP_SERVERS right?[/]")
        return 2
    except KafkaError as exc:
        err.print(f"[red]Kafka refused: {type(exc).__name__}: {escape(str(exc))}[/]")
        return 1
    except TimeoutError:
        err.print("[red]timed out waiting for Kafka[/]")
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


def main() -> None:
    app()
