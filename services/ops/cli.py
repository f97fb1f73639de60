"""The `switchboard` command line: run a goal in this process, serve a role on Kafka, submit a goal.
The `dlq` commands are in services/ops/dlq_cli.py, `audit` in services/ops/audit_cli.py, and
`approvals`, `approve` and `deny` in services/ops/approvals_cli.py, and `goal cancel|pause|resume|status`
in services/ops/lifecycle_cli.py."""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import Annotated

import typer
from pydantic import ValidationError

from schemas.budget import BudgetLimits
from schemas.events import GoalCompleted, GoalFailed, GoalSubmitted, decode_event
from schemas.topics import Topics
from services.ops.approvals_cli import approvals_app, approve, deny, list_approvals
from services.ops.audit_cli import audit
from services.ops.dlq_cli import dlq_app
from services.ops.lag_cli import lag
from services.ops.lifecycle_cli import answer, cancel, pause, resume, status
from services.ops.prompts_cli import prompts
from services.ops.replay_cli import replay
from services.ops.top_cli import top
from services.ops.trace_cli import trace
from services.ops.terminal import (
    TenantOption,
    command,
    console,
    err,
    run_async,
    setup_logging,
)
from services.runtime.bus import Delivery
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError
from services.runtime.goal_types import GoalTypes
from services.runtime.host import ServiceSpec, Settings, kafka_app, run_embedded
from services.runtime.metrics import Metrics, serve_metrics
from services.runtime.signing import Signer
from services.runtime.tracecontext import new_traceparent

app = typer.Typer(
    help="Switchboard: an event-driven multi-agent platform on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
goal_app = typer.Typer(help="Submit goals to a running deployment and follow them.", no_args_is_help=True)
app.add_typer(goal_app, name="goal")
app.add_typer(dlq_app, name="dlq")
command(app, "audit")(audit)
command(app, "lag")(lag)
command(app, "prompts")(prompts)
command(app, "trace")(trace)
command(app, "replay")(replay)
command(app, "top")(top)
app.add_typer(approvals_app, name="approvals")
command(approvals_app, "list")(list_approvals)
command(app, "approve")(approve)
command(app, "deny")(deny)
command(goal_app, "cancel")(cancel)
command(goal_app, "pause")(pause)
command(goal_app, "resume")(resume)
command(goal_app, "status")(status)
command(goal_app, "answer")(answer)


class Role(str, Enum):
    orchestrator = "orchestrator"
    agent = "agent"
    tools = "tools"
    memory = "memory"
    gateway = "gateway"
    all = "all"


TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for the goal to finish.")]

# The budget a submission asks for. BudgetLimits judges the values, so that a CLI can never accept
# what the orchestrator would refuse; budget_limits() turns its verdict into a usage error.
_BUDGET_PANEL = "Budget"
MaxStepsOption = Annotated[int | None, typer.Option(
    help="At most this many model calls for the whole goal: planning, every agent step, the answer.",
    rich_help_panel=_BUDGET_PANEL,
)]
MaxTokensOption = Annotated[int | None, typer.Option(
    help="At most this many tokens (input plus output) across the goal's model calls.", rich_help_panel=_BUDGET_PANEL,
)]
MaxCostOption = Annotated[float | None, typer.Option(
    help="At most this much model spend, in US dollars.", rich_help_panel=_BUDGET_PANEL,
)]
MaxToolCallsOption = Annotated[int | None, typer.Option(help="At most this many tool calls.", rich_help_panel=_BUDGET_PANEL)]
DeadlineOption = Annotated[float | None, typer.Option(
    help="Fail the goal when it is not done this many seconds after it was submitted.",
    rich_help_panel=_BUDGET_PANEL,
)]
BUDGET_HELP = """
    The budget options can only lower a goal's limits. The defaults come from SWITCHBOARD_BUDGET_*,
    and the tenant's policy (SWITCHBOARD_BUDGET_TENANT_POLICIES; without one, those defaults) is the
    ceiling: a goal that asks for more than its ceiling fails with reason budget_policy.
"""
_BUDGET_OPTION = {
    "max_steps": "--max-steps", "max_tokens": "--max-tokens", "max_cost_usd": "--max-cost",
    "max_tool_calls": "--max-tool-calls", "deadline_s": "--deadline",
}


def budget_limits(
    max_steps: int | None, max_tokens: int | None, max_cost: float | None, max_tool_calls: int | None,
    deadline: float | None,
) -> BudgetLimits:
    """The limits the budget options ask for; a usage error (exit 2) naming the option for a value out of range."""
    try:
        return BudgetLimits(
            max_steps=max_steps, max_tokens=max_tokens, max_cost_usd=max_cost, max_tool_calls=max_tool_calls,
            deadline_s=deadline,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        option = _BUDGET_OPTION.get(str(error["loc"][0]) if error["loc"] else "")
        raise typer.BadParameter(f"{_lower_first(error['msg'])} (got {error['input']!r})", param_hint=option) from exc


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:]


GoalTypeOption = Annotated[str | None, typer.Option(
    "--type", help="The goal's type: what happens when its agents fail (a fallback, or a person answers). "
    "Types are *.toml files in SWITCHBOARD_GOAL_TYPES_DIR (packaged: arithmetic, lookup, reviewed).",
)]


def new_goal(text: str, tenant: str, budget: BudgetLimits, goal_type: str | None = None,
             settings: Settings | None = None) -> GoalSubmitted:
    """The submission; a usage error (exit 2) naming the argument for an empty or oversized goal,
    a malformed tenant, or a goal type that is not configured."""
    if goal_type is not None:
        try:
            GoalTypes.load((settings or Settings()).platform.goal_types_dir).get(goal_type)
        except ConfigurationError as exc:
            raise typer.BadParameter(str(exc), param_hint="--type") from exc
    try:
        return GoalSubmitted(tenant=tenant, goal_id=f"g-{new_id()}", text=text, budget=budget, goal_type=goal_type)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = str(error["loc"][0]) if error["loc"] else ""
        hint = {"text": "GOAL", "tenant": "--tenant", "goal_type": "--type"}.get(where, where)
        raise typer.BadParameter(_lower_first(error["msg"]), param_hint=hint) from exc


def _all_services(settings: Settings) -> list[ServiceSpec]:
    kinds = AgentCatalogue.load(settings.platform.agents_dir).names
    return [
        ServiceSpec("orchestrator"),
        *(ServiceSpec("agent", {"kind": k}) for k in kinds),
        ServiceSpec("tools"),
        ServiceSpec("memory"),
    ]


@command(app, "run", BUDGET_HELP)
def run(
    goal: Annotated[str, typer.Argument(help="What you want done, in plain words.")],
    tenant: TenantOption = None,
    goal_type: GoalTypeOption = None,
    timeout: TimeoutOption = 120.0,
    max_steps: MaxStepsOption = None,
    max_tokens: MaxTokensOption = None,
    max_cost: MaxCostOption = None,
    max_tool_calls: MaxToolCallsOption = None,
    deadline: DeadlineOption = None,
) -> None:
    """Run GOAL through every service in this process: no servers, no API key.

    Uses the embedded defaults: an in-process bus, in-process stores, Qdrant local mode under
    SWITCHBOARD_DATA_DIR, and the offline model (unless an agent's model says otherwise).
    Prints the plan, tasks, memory recalls and tool calls as they happen, then the answer.
    Exits 0 when the goal completes (by its agents or its type's fallback), 1 when it fails, 3
    when it escalates to a person (nobody can answer in this process).
    """
    budget = budget_limits(max_steps, max_tokens, max_cost, max_tool_calls, deadline)
    settings = Settings()
    event = new_goal(goal, tenant or settings.platform.tenant, budget, goal_type, settings)
    setup_logging(settings, quiet=True)
    from services.ops.progress import ProgressView

    async def main() -> int:
        async with run_embedded(_all_services(settings), settings) as (bus, runtime):
            view = ProgressView(console, event.goal_id)
            finished = asyncio.Event()

            async def observe(delivery: Delivery) -> None:
                try:
                    shown = decode_event(delivery.value)
                except (ValidationError, ValueError):
                    return  # not an event (a dead letter's copy of a bad message): nothing to show
                view.show(shown)
                if isinstance(shown, GoalCompleted | GoalFailed) or view.escalated is not None:
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
            if view.escalated is not None:
                err.print("[yellow]the goal waits for a person: nobody can answer it in an embedded run[/]")
                return 3
            return 0 if isinstance(view.outcome, GoalCompleted) else 1

    raise typer.Exit(run_async(main()))


@command(app, "serve")
def serve(
    role: Annotated[Role, typer.Argument(help="Which role to run.", case_sensitive=False)],
    kind: Annotated[str | None, typer.Option(help="Agent kind, for the agent role (default: $AGENT_KIND, else researcher).")] = None,
    model: Annotated[str | None, typer.Option(help="LiteLLM model string overriding the agent kind's model.")] = None,
) -> None:
    """Run one role as a Kafka consumer group member until interrupted.

    Needs KAFKA_BOOTSTRAP_SERVERS and REDIS_URL (start local ones with `make infra-up`).
    Start as many replicas of a role as you like: they share its consumer group.
    `all` runs every consumer role in this process (every agent kind).
    `gateway` runs the HTTP gateway instead (services/gateway): submit, follow and steer goals over
    HTTP on GATEWAY_HOST:GATEWAY_PORT (default 127.0.0.1:8080); it needs GATEWAY_API_KEYS.
    Serves Prometheus metrics of every role it runs on SWITCHBOARD_METRICS_PORT (default 9464;
    0 turns it off): each process on one machine needs its own port.
    """
    settings = Settings()
    setup_logging(settings, quiet=False)
    if role is Role.gateway:  # an HTTP server, not a consumer group member
        from services.gateway.app import prepare

        try:
            server = prepare(settings)
        except ConfigurationError as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
        raise typer.Exit(server.run())
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
    metrics = Metrics()
    try:
        faststream_app = kafka_app(specs, settings, metrics=metrics)
        endpoint = serve_metrics(metrics, settings.platform.metrics_host, settings.platform.metrics_port)
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    try:
        code = run_async(faststream_app.run()) or 0
    finally:
        if endpoint is not None:
            endpoint.close()
    raise typer.Exit(code)


@command(goal_app, "submit", BUDGET_HELP)
def submit(
    text: Annotated[str, typer.Argument(help="The goal, in plain words.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print progress live and wait for the result.")] = False,
    tenant: TenantOption = None,
    goal_type: GoalTypeOption = None,
    timeout: TimeoutOption = 600.0,
    max_steps: MaxStepsOption = None,
    max_tokens: MaxTokensOption = None,
    max_cost: MaxCostOption = None,
    max_tool_calls: MaxToolCallsOption = None,
    deadline: DeadlineOption = None,
) -> None:
    """Publish a goal to Kafka. Prints its id; with --follow, its progress and final answer.

    With --follow, exits 0 when the goal completes, 1 when it fails or is cancelled, 2 on timeout.
    A goal that escalates to a person is followed until someone answers or cancels it.
    """
    budget = budget_limits(max_steps, max_tokens, max_cost, max_tool_calls, deadline)
    settings = Settings()
    event = new_goal(text, tenant or settings.platform.tenant, budget, goal_type, settings)
    setup_logging(settings, quiet=True)
    from services.ops.kafka_client import goal_events, goal_follower, publish
    from services.ops.progress import ProgressView
    from services.runtime.kafka_bus import ensure_topics

    topics = Topics(settings.platform.namespace, AgentCatalogue.load(settings.platform.agents_dir).names)

    signer = Signer.from_setting(settings.platform.signing_key)

    async def main() -> int:
        if not follow:
            await ensure_topics(settings.kafka, topics.all_topics(), settings.platform.partitions)
            await publish(settings.kafka, topics.goals, event, event.goal_id, signer)
            console.print(event.goal_id)
            return 0
        view = ProgressView(console, event.goal_id)
        async with goal_follower(settings.kafka, topics, settings.platform.partitions) as consumer:
            await publish(settings.kafka, topics.goals, event, event.goal_id, signer)
            try:
                async with asyncio.timeout(timeout):
                    async for shown in goal_events(consumer, event.goal_id):
                        view.show(shown)
                        if view.outcome is not None or view.cancelled:
                            break
            except TimeoutError:
                err.print(f"[red]goal {event.goal_id} did not finish within {timeout:.0f}s[/]")
                return 2
        return 0 if isinstance(view.outcome, GoalCompleted) else 1

    raise typer.Exit(run_async(main()))


def new_id() -> str:
    from schemas.envelope import new_id as _new

    return _new()[:12]


def main() -> None:
    app()
