"""The tool implementations this executor runs, by name. Argument models live in schemas.tools.

How a tool says what went wrong decides what happens to the request:
- ToolUsageError: the tool answered with an error the model can act on (a bad expression,
  division by zero, a malformed URL): an ok=false reply to the agent;
- ToolDenied, from a tool's `check`: policy forbids the call: dead-lettered, `tool_denied`;
- Retryable: a transient failure (5xx, 408, 429, a refused or reset connection, a timeout): retried;
- anything else is a crash: dead-lettered, `tool_failed` (see limits.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from schemas.tools import CalculatorArgs, HttpGetArgs, SaveNoteArgs, ToolArgs
from services.runtime.errors import Permanent, Retryable, SwitchboardError, ToolDenied
from services.tools.calculator import CalculatorError, evaluate


@dataclass(frozen=True)
class CallContext:
    tenant: str
    goal_id: str
    task_id: str
    idempotency_key: str


ToolFn = Callable[[ToolArgs, CallContext], Awaitable[str]]
ToolCheck = Callable[[ToolArgs], None]


def _allow_all(_: ToolArgs) -> None:
    return None


@dataclass(frozen=True)
class Tool:
    run: ToolFn
    check: ToolCheck = _allow_all
    """Raises ToolDenied when policy forbids this call. It runs before the tool's limits, so a
    denied call never waits for a slot and never counts toward the circuit breaker."""


class ToolUsageError(SwitchboardError):
    """The tool answered, with an error the model can act on: the agent gets it as ok=false."""


class ToolFailed(Permanent):
    """The tool crashed: trying again will not help."""

    reason = "tool_failed"


# A 408 or 429 says "not now" rather than "wrong request".
_TRANSIENT_4XX = frozenset({408, 429})


def calculator() -> Tool:
    async def run(args: ToolArgs, _: CallContext) -> str:
        assert isinstance(args, CalculatorArgs)
        try:
            return f"{args.expression} = {evaluate(args.expression)}"
        except CalculatorError as exc:
            raise ToolUsageError(str(exc)) from exc

    return Tool(run)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> str:
    """The TOOLS_HTTP_HEADERS key of a URL: `host` on the scheme's default port, else `host:port`."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port
    return host if port is None or port == _DEFAULT_PORTS.get(parts.scheme) else f"{host}:{port}"


def http_get(
    enabled: bool, allowed_hosts: frozenset[str], max_bytes: int, timeout_s: float,
    host_headers: Mapping[str, Mapping[str, SecretStr]] | None = None,
) -> Tool:
    """`host_headers` (TOOLS_HTTP_HEADERS) are sent to their host only: the executor's secrets,
    never the model's to set. A key `host` means that host on the scheme's default port, `host:port`
    that port: the allowlist admits every port of a host, its secrets do not go to every port.
    Redirects are not followed, so they cannot carry them elsewhere."""
    configured = host_headers or {}

    def check(args: ToolArgs) -> None:
        assert isinstance(args, HttpGetArgs)
        if not enabled:
            raise ToolDenied("http_get is disabled (TOOLS_HTTP_ENABLED=false)", policy="TOOLS_HTTP_ENABLED")
        host = (urlsplit(args.url).hostname or "").lower()
        if host not in allowed_hosts:
            raise ToolDenied(
                f"host {host!r} is not on the allowlist {sorted(allowed_hosts)}", policy="TOOLS_HTTP_ALLOWED_HOSTS"
            )

    async def run(args: ToolArgs, _: CallContext) -> str:
        assert isinstance(args, HttpGetArgs)
        check(args)  # also when called on its own, not through the executor
        headers = {name: value.get_secret_value() for name, value in configured.get(_origin(args.url), {}).items()}
        body = bytearray()
        try:
            async with (
                httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client,
                client.stream("GET", args.url, headers=headers) as response,
            ):
                status = response.status_code
                if status >= 500 or status in _TRANSIENT_4XX:
                    raise Retryable(f"GET {args.url} answered {status}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= max_bytes:  # stop reading: a huge page must not fill memory
                        break
        except httpx.TransportError as exc:  # timeouts, refused and reset connections
            raise Retryable(f"GET {args.url} failed: {type(exc).__name__}: {exc}") from exc
        except httpx.InvalidURL as exc:
            raise ToolUsageError(f"GET {args.url}: {exc}") from exc
        text = bytes(body[:max_bytes]).decode(response.encoding or "utf-8", errors="replace")
        # Any other status, 4xx included, is the page's answer: the model reads it and adapts.
        return f"HTTP {status}\n{text}"

    return Tool(run, check)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def save_note(sandbox: Path) -> Tool:
    """Appends one record per idempotency key to <sandbox>/<tenant>/notes.jsonl: a real, countable
    side effect. Like an external API that takes an idempotency key, it also refuses a key it has
    written already: the last line of defence when the executor's Redis record of the run was lost."""

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
        await asyncio.to_thread(_append_once, directory / "notes.jsonl", json.dumps(record), ctx.idempotency_key)
        return f"saved note {args.title!r} ({len(args.body)} characters)"

    return Tool(run)


def _append_once(path: Path, line: str, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # check and append as one step across executors
        handle.seek(0)
        if any(json.loads(existing).get("idempotency_key") == key for existing in handle if existing.strip()):
            return
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
