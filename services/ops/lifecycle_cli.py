"""`switchboard goal cancel|pause|resume|answer|status ID`: ask the orchestrator to change a goal's
state, answer a goal that waits for a person, and read the state a goal is in."""

from __future__ import annotations

import asyncio
import getpass
import socket
from typing import Annotated

import typer
from redis.asyncio import Redis
from rich.markup import escape
from rich.table import Table

from memory.keys import RedisKeys
from schemas.events import (
    MAX_TEXT,
    GoalAnswered,
    GoalLifecycleRejected,
    GoalLifecycleRequested,
    GoalStateChanged,
    LifecycleRequest,
)
from schemas.topics import Topics
from services.ops.terminal import TenantOption, console, echo_json, err, reader_settings, run_async, setup_logging
from services.runtime.budget import BudgetLedger
from services.runtime.goal_view import GoalStateView
from services.runtime.host import Settings
from services.runtime.signing import Signer

GoalIdArgument = Annotated[str, typer.Argument(metavar="ID", help="The goal's id, as `goal submit` printed it.")]
ByOption = Annotated[str | None, typer.Option("--by", help="Who asks (default: $USER@hostname); announced with the change.")]
ReasonOption = Annotated[str, typer.Option(help="Why; announced with the change.")]
WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the orchestrator's answer (default), or return once sent.")]
TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for the orchestrator's answer.")]


def _actor(by: str | None) -> str:
    return by or f"{getpass.getuser()}@{socket.gethostname()}"


async def _request(action: LifecycleRequest, goal_id: str, tenant: str | None, by: str | None, reason: str,
                   wait: bool, timeout: float) -> int:
    settings, topics = reader_settings()
    request = GoalLifecycleRequested(
        tenant=tenant or settings.platform.tenant, goal_id=goal_id, action=action, requested_by=_actor(by),
        reason=reason,
    )
    return await _ask(settings, topics, request, action, wait, timeout)


async def _ask(
    settings: Settings, topics: Topics, request: GoalLifecycleRequested | GoalAnswered, action: str, wait: bool,
    timeout: float,
) -> int:
    """Send the request; with `wait`, print the orchestrator's answer to it (exit 0, or 1 rejected)."""
    from services.ops.kafka_client import goal_events, goal_follower, publish
    from services.runtime.kafka_bus import ensure_topics

    goal_id = request.goal_id
    signer = Signer.from_setting(settings.platform.signing_key)
    if not wait:
        await ensure_topics(settings.kafka, topics.all_topics(), settings.platform.partitions)
        await publish(settings.kafka, topics.goals, request, goal_id, signer)
        console.print(f"asked to {action} goal {escape(goal_id)} ({request.event_id})")
        return 0
    async with goal_follower(settings.kafka, topics, settings.platform.partitions) as consumer:
        await publish(settings.kafka, topics.goals, request, goal_id, signer)
        try:
            async with asyncio.timeout(timeout):
                with console.status(f"asked to {action} goal {escape(goal_id)}; waiting for the orchestrator"):
                    async for event in goal_events(consumer, goal_id):
                        if event.causation_id != request.event_id:
                            continue
                        if isinstance(event, GoalStateChanged):
                            console.print(
                                f"goal {escape(goal_id)} is {event.to_state} (was {event.from_state})"
                            )
                            return 0
                        if isinstance(event, GoalLifecycleRejected):
                            err.print(f"[red]{escape(event.detail)}[/]")
                            return 1
        except TimeoutError:
            err.print(f"[red]no answer from the orchestrator within {timeout:.0f}s; is it running?[/]")
            return 2
    return 2  # the event stream does not end


def cancel(goal_id: GoalIdArgument, reason: ReasonOption = "", tenant: TenantOption = None, by: ByOption = None,
           wait: WaitOption = True, timeout: TimeoutOption = 60.0) -> None:
    """Cancel a goal: every task of it stops at its next step, on every replica. Calls in flight
    finish and their results are kept; nothing more starts. Exits 1 when the goal's state does not
    allow it (it ended already, or is unknown), 2 when no answer comes."""
    raise typer.Exit(run_async(_request("cancel", goal_id, tenant, by, reason, wait, timeout)))


def pause(goal_id: GoalIdArgument, reason: ReasonOption = "", tenant: TenantOption = None, by: ByOption = None,
          wait: WaitOption = True, timeout: TimeoutOption = 60.0) -> None:
    """Pause a running goal: its tasks stop at their next step, on every replica, and keep their
    checkpoints. Exits 1 when the goal is not running, 2 when no answer comes."""
    raise typer.Exit(run_async(_request("pause", goal_id, tenant, by, reason, wait, timeout)))


def resume(goal_id: GoalIdArgument, reason: ReasonOption = "", tenant: TenantOption = None, by: ByOption = None,
           wait: WaitOption = True, timeout: TimeoutOption = 60.0) -> None:
    """Resume a paused goal: its tasks continue from their checkpoints (nothing restarts), and
    tasks that finished meanwhile let the ones after them start. Exits 1 when the goal is not
    paused, 2 when no answer comes."""
    raise typer.Exit(run_async(_request("resume", goal_id, tenant, by, reason, wait, timeout)))


def answer(
    goal_id: GoalIdArgument,
    text: Annotated[str, typer.Argument(metavar="ANSWER", help="The goal's answer, in plain words.")],
    tenant: TenantOption = None, by: ByOption = None, wait: WaitOption = True, timeout: TimeoutOption = 60.0,
) -> None:
    """Answer a goal that waits for a person (its agents failed and its type escalates; `goal status`
    shows it as waiting_for_human): it completes with this answer, which records who gave it.
    Exits 1 when the goal is not waiting for a person, 2 when no answer comes."""
    if not text.strip() or len(text) > MAX_TEXT:
        raise typer.BadParameter(f"the answer must be 1 to {MAX_TEXT} characters", param_hint="ANSWER")
    settings, topics = reader_settings()
    request = GoalAnswered(
        tenant=tenant or settings.platform.tenant, goal_id=goal_id, answer=text, answered_by=_actor(by),
    )
    raise typer.Exit(run_async(_ask(settings, topics, request, "answer", wait, timeout)))


def status(goal_id: GoalIdArgument, tenant: TenantOption = None,
           json_output: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False) -> None:
    """Show a goal's state, its tasks and what it has spent. Exits 2 for a goal the orchestrator
    does not know (or has forgotten: the state expires after ORCHESTRATOR_STATE_TTL_S)."""
    settings = Settings()
    setup_logging(settings, quiet=True)
    if not settings.redis.url:
        err.print("[red]REDIS_URL is not set: a goal's state is kept in the deployment's Redis.[/]")
        raise typer.Exit(2)
    owner = tenant or settings.platform.tenant

    async def main() -> int:
        redis = Redis.from_url(settings.redis.url or "")
        try:
            keys = RedisKeys(settings.platform.namespace)
            raw = await redis.get(keys.goal_state(owner, goal_id))
            budget = await BudgetLedger(redis, keys, settings.budget).status(owner, goal_id)
        finally:
            await redis.aclose()
        if raw is None:
            err.print(f"[red]no goal {escape(goal_id)} for tenant {escape(owner)}[/]")
            return 2
        view = GoalStateView.model_validate_json(raw)
        tasks = [
            {"id": pid, "task_id": t.task_id, "kind": t.planned.kind, "status": t.status}
            for pid, t in view.tasks.items()
        ]
        spent = budget.spent if budget else {}
        if json_output:
            echo_json({
                "goal_id": goal_id, "tenant": owner, "state": view.status, "text": view.goal.text,
                "tasks": tasks, "spent": spent, "in_flight": budget.in_flight if budget else 0,
            })
            return 0
        console.print(f"goal {escape(goal_id)} is [bold]{view.status}[/]: {escape(view.goal.text)}")
        if tasks:
            table = Table(title_justify="left")
            for column in ("task", "agent", "status"):
                table.add_column(column)
            for t in tasks:
                table.add_row(str(t["id"]), str(t["kind"]), str(t["status"]))
            console.print(table)
        if spent:
            figures = ", ".join(f"{name} {value:g}" for name, value in spent.items())
            console.print(f"spent: {figures}" + (f"; {budget.in_flight} call(s) in flight" if budget and budget.in_flight else ""))
        return 0

    raise typer.Exit(run_async(main()))
