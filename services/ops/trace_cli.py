"""`switchboard trace GOAL`: a goal's timeline from its event record in Redis and its dead letters."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from memory.keys import RedisKeys
from memory.timeline import GoalTimeline
from schemas.envelope import Envelope
from services.ops import dlq
from services.ops.terminal import TenantOption, console, echo_json, err, reader_settings, run_async
from services.ops.trace_view import build_trace, recorded_events, trace_tree


async def load_record(redis_url: str, namespace: str, tenant: str, goal_id: str) -> list[Envelope] | None:
    """The goal's recorded events, or None after saying why there are none (no record, no Redis)."""
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    redis = Redis.from_url(redis_url)
    try:
        # Only read: the stream's length and expiry are the recorder's.
        events = await recorded_events(GoalTimeline(redis, RedisKeys(namespace), 0, 0), tenant, goal_id)
    except RedisConnectionError as exc:
        err.print(f"[red]cannot reach Redis: {escape(str(exc))}. Is it running, and is REDIS_URL right?[/]")
        return None
    finally:
        await redis.aclose()
    if events is None:
        err.print(
            f"[red]no record of goal {escape(goal_id)} for tenant {escape(tenant)} in namespace "
            f"{escape(namespace)}[/]: check the goal id and --tenant. Records expire MEMORY_STREAM_TTL_S "
            "seconds (7 days by default) after the goal's last event."
        )
    return events


def trace(
    goal_id: Annotated[str, typer.Argument(metavar="GOAL", help="The goal's id, as `goal submit` printed it (g-...).")],
    tenant: TenantOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts) instead of the tree.")] = False,
) -> None:
    """Print a goal's timeline: the plan, every task's steps, its dead letters, its end and totals.

    The timeline is the goal's event record, which the memory service keeps in Redis (one stream
    per goal): the submission; the plan with its tasks, their dependencies and the budget; per
    task its assignment, memory recalls (hits, with their kinds and labels), every model call
    (model, prompt version, tokens in and out, context tokens, cost, latency), every tool call
    (arguments, ok or error, whether a stored result answered) and its result or failure. Then the
    goal's dead-letter records (read from the namespace's dead-letter topics, as `dlq list --goal`
    does), its answer or failure with reason and figures, and totals: model calls, tokens, cost,
    tool calls and wall time. Events are in time order.

    Needs REDIS_URL and KAFKA_BOOTSTRAP_SERVERS. Exits 0; 2 when the goal has no record for the
    tenant (a wrong goal id or --tenant, or the record expired: records are kept MEMORY_STREAM_TTL_S
    after the goal's last event, 7 days by default), or on a missing setting or unreachable server.
    """
    settings, topics = reader_settings()
    who = tenant or settings.platform.tenant
    if not settings.redis.url:
        err.print("[red]REDIS_URL is not set: the goal's timeline is in Redis (the memory service's record)[/]")
        raise typer.Exit(2)

    async def main() -> int:
        events = await load_record(settings.redis.url or "", topics.namespace, who, goal_id)
        if events is None:
            return 2
        letters = await dlq.select(settings.kafka, topics, dlq.Selection(goals=frozenset({goal_id})))
        mine = [d for d in letters if d.tenant in (None, who)]
        data = build_trace(goal_id, who, events, mine).to_json()
        if as_json:
            echo_json(data)
        else:
            console.print(trace_tree(data))
        return 0

    raise typer.Exit(run_async(main()))
