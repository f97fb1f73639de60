"""The tool implementations this executor runs, by name. Argument models live in schemas.tools."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from schemas.tools import CalculatorArgs, HttpGetArgs, SaveNoteArgs, ToolArgs
from services.runtime.errors import Permanent, Retryable
from services.tools.calculator import CalculatorError, evaluate


@dataclass(frozen=True)
class CallContext:
    tenant: str
    goal_id: str
    task_id: str
    idempotency_key: str


ToolFn = Callable[[ToolArgs, CallContext], Awaitable[str]]


class ToolFailed(Permanent):
    reason = "tool_failed"


async def calculator(args: ToolArgs, _: CallContext) -> str:
    assert isinstance(args, CalculatorArgs)
    try:
        return f"{args.expression} = {evaluate(args.expression)}"
    except CalculatorError as exc:
        raise ToolFailed(str(exc)) from exc


def http_get(enabled: bool, allowed_hosts: frozenset[str], max_bytes: int, timeout_s: float) -> ToolFn:
    async def run(args: ToolArgs, _: CallContext) -> str:
        assert isinstance(args, HttpGetArgs)
        if not enabled:
            raise ToolFailed("http_get is disabled (TOOLS_HTTP_ENABLED=false)")
        host = (urlsplit(args.url).hostname or "").lower()
        if host not in allowed_hosts:
            raise ToolFailed(f"host {host!r} is not on the allowlist {sorted(allowed_hosts)}")
        body = bytearray()
        try:
            async with (
                httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client,
                client.stream("GET", args.url) as response,
            ):
                if response.status_code >= 500:
                    raise Retryable(f"GET {args.url} answered {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= max_bytes:  # stop reading: a huge page must not fill memory
                        break
        except httpx.TimeoutException as exc:
            raise Retryable(f"GET {args.url} timed out") from exc
        except httpx.HTTPError as exc:
            raise ToolFailed(f"GET {args.url} failed: {exc}") from exc
        text = bytes(body[:max_bytes]).decode(response.encoding or "utf-8", errors="replace")
        return f"HTTP {response.status_code}\n{text}"

    return run


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def save_note(sandbox: Path) -> ToolFn:
    """Appends one record per run to <sandbox>/<tenant>/notes.jsonl: a real, countable side effect."""

    async def run(args: ToolArgs, ctx: CallContext) -> str:
        assert isinstance(args, SaveNoteArgs)
        directory = sandbox / _UNSAFE.sub("_", ctx.tenant)
        record = {
            "title": args.title,
            "body": args.body,
            "goal_id": ctx.goal_id,
            "task_id": ctx.task_id,
            "idempotency_key": ctx.idempotency_key,
            "written_at": datetime.now(UTC).isoformat(),
        }
        await asyncio.to_thread(_append, directory / "notes.jsonl", json.dumps(record))
        return f"saved note {args.title!r} ({len(args.body)} characters)"

    return run


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
