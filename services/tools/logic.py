"""Tool execution decisions: re-check the allowlist, validate arguments, run once, answer the agent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.events import ToolCallCompleted, ToolCallRequested
from schemas.tools import TOOL_SPECS
from services.runtime.bus import Outgoing
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import Permanent, Retryable
from services.runtime.idempotency import SideEffectGuard, idempotency_digest
from services.tools.registry import CallContext, ToolFn


@dataclass(frozen=True)
class ToolsDeps:
    tools: dict[str, ToolFn]
    catalogue: AgentCatalogue
    guard: SideEffectGuard
    timeout_s: float


async def execute(deps: ToolsDeps, request: ToolCallRequested) -> list[Outgoing]:
    spec = TOOL_SPECS.get(request.tool)
    tool = deps.tools.get(request.tool)
    if spec is None or tool is None:
        return [_reply(request, ok=False, error=f"unknown tool {request.tool!r} on this executor")]
    kind = deps.catalogue.kinds.get(request.agent_kind)
    if kind is None or request.tool not in kind.tools:
        # The agent checked this already; the executor checks again, in case the request was forged.
        return [_reply(request, ok=False, error=f"tool {request.tool!r} is not allowed for {request.agent_kind!r}")]
    try:
        args = spec.args.model_validate(request.arguments)
    except ValidationError as exc:
        return [_reply(request, ok=False, error=f"invalid arguments: {exc}")]
    canonical = args.model_dump(mode="json")
    digest = idempotency_digest(request.goal_id, request.task_id, request.step_id, request.tool, canonical)
    ctx = CallContext(request.tenant, request.goal_id, request.task_id or "", digest)

    async def run() -> str:
        try:
            async with asyncio.timeout(deps.timeout_s):
                return await tool(args, ctx)
        except TimeoutError as exc:
            raise Retryable(f"{request.tool} timed out after {deps.timeout_s}s") from exc

    try:
        if spec.side_effect:
            output, replayed = await deps.guard.run_once(request.tenant, digest, run)
        else:
            output, replayed = await run(), False
    except Permanent as exc:
        return [_reply(request, ok=False, error=str(exc))]
    return [_reply(request, ok=True, output=output, replayed=replayed)]


def _reply(
    request: ToolCallRequested, *, ok: bool, output: str = "", error: str | None = None, replayed: bool = False
) -> Outgoing:
    event = ToolCallCompleted(
        **request.caused(), call_id=request.call_id, step_id=request.step_id, tool=request.tool,
        ok=ok, output=output, error=error, replayed=replayed,
    )
    return Outgoing(request.reply_to, event, request.task_id or request.goal_id)
