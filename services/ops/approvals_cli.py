"""`switchboard approvals list`, `switchboard approve ID`, `switchboard deny ID --reason`: settle the
tool calls that wait for a person (tools listed in TOOLS_NEEDS_APPROVAL)."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Annotated

import typer
from aiokafka import AIOKafkaProducer
from rich.markup import escape
from rich.table import Table

from schemas.events import ApprovalDecided
from services.ops.terminal import console, echo_json, err, reader_settings, run_async
from services.runtime.approvals import Approval, ApprovalBook
from services.runtime.host import Settings, open_runtime
from services.runtime.signing import Signer, event_headers
from services.runtime.tracecontext import child_traceparent

approvals_app = typer.Typer(help="Tool calls waiting for a person's approval.", no_args_is_help=True)

ActorOption = Annotated[str | None, typer.Option("--by", help="Who decides (default: $USER@hostname); audited.")]


def _actor(by: str | None) -> str:
    return by or f"{getpass.getuser()}@{socket.gethostname()}"


def _require_redis(settings: Settings) -> None:
    if not settings.redis.url:
        err.print("[red]REDIS_URL is not set: approvals wait in the deployment's Redis.[/]")
        raise typer.Exit(2)


def _row(approval: Approval) -> dict[str, object]:
    r = approval.request
    return {
        "approval_id": approval.approval_id, "tenant": r.tenant, "goal_id": r.goal_id, "task_id": r.task_id,
        "tool": r.tool, "arguments": r.arguments, "agent_kind": r.agent_kind,
        "expires_at": approval.expires.isoformat(),
    }


def list_approvals(json_output: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False) -> None:
    """The tool calls waiting for a decision, soonest to expire first."""
    settings, _ = reader_settings()
    _require_redis(settings)

    async def main() -> int:
        async with open_runtime(settings) as runtime:
            waiting = await ApprovalBook(runtime.redis, runtime.keys).pending()
        if json_output:
            echo_json([_row(approval) for approval in waiting])
            return 0
        if not waiting:
            console.print("no tool call is waiting for approval")
            return 0
        table = Table(title=f"{len(waiting)} waiting for approval", title_justify="left")
        for column in ("id", "tenant", "goal", "agent", "tool", "arguments", "expires in"):
            table.add_column(column)
        now = datetime.now(UTC)
        for approval in waiting:
            r = approval.request
            left = max(0, int((approval.expires - now).total_seconds()))
            args = escape(str(r.arguments))
            table.add_row(approval.approval_id, r.tenant, r.goal_id, r.agent_kind, r.tool, args[:80], f"{left}s")
        console.print(table)
        return 0

    raise typer.Exit(run_async(main()))


async def _decide(approval_id: str, approved: bool, by: str, reason: str) -> int:
    settings, topics = reader_settings()
    _require_redis(settings)
    async with open_runtime(settings) as runtime:
        approval = await ApprovalBook(runtime.redis, runtime.keys).find(approval_id)
    if approval is None or approval.state != "pending":
        err.print(f"[red]no tool call is waiting for approval {escape(approval_id)}[/] (see `switchboard approvals list`)")
        return 1
    r = approval.request
    decision = ApprovalDecided(**r.caused(), approval_id=approval_id, approved=approved, decided_by=by, reason=reason)
    value = decision.to_bytes()
    # The executor refuses unsigned decisions, as it refuses unsigned requests.
    signer = Signer.from_setting(settings.platform.signing_key)
    headers = [
        (name, text.encode())
        for name, text in event_headers(decision, value, signer, child_traceparent(approval.traceparent)).items()
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.require(), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topics.tools, value, key=(r.task_id or r.goal_id).encode(), headers=headers)
    finally:
        await producer.stop()
    verb = "approved" if approved else "denied"
    console.print(f"{verb} {r.tool} call {escape(r.call_id)} of goal {escape(r.goal_id)} ({escape(approval_id)}) as {escape(by)}")
    return 0


def approve(
    approval_id: Annotated[str, typer.Argument(metavar="ID", help="From `switchboard approvals list`.")],
    by: ActorOption = None,
) -> None:
    """Approve a waiting tool call: the tools executor runs it and the task goes on. Audited."""
    raise typer.Exit(run_async(_decide(approval_id, True, _actor(by), "")))


def deny(
    approval_id: Annotated[str, typer.Argument(metavar="ID", help="From `switchboard approvals list`.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the dead letter and in the audit trail.")],
    by: ActorOption = None,
) -> None:
    """Deny a waiting tool call: it is dead-lettered as approval_denied and its goal fails. Audited."""
    raise typer.Exit(run_async(_decide(approval_id, False, _actor(by), reason)))
