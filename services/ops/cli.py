"""The `switchboard` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from enum import Enum
from typing import Annotated

import typer
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError
from rich.console import Console

from schemas.events import GoalCompleted, GoalFailed, GoalSubmitted, decode_event
from schemas.topics import Topics
from services.runtime.bus import Delivery
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError
from services.runtime.host import ServiceSpec, Settings, kafka_app, run_embedded
from services.runtime.tracecontext import new_traceparent

app = typer.Typer(
    help="Switchboard: an event-driven multi-agent platform on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
goal_app = typer.Typer(help="Submit goals to a running deployment and follow them.", no_args_is_help=True)
app.add_typer(goal_app, name="goal")

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
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


def main() -> None:
    app()
