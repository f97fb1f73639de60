"""What every `switchboard` command shares: its consoles, its log set-up, help text that reads well
at any width, time options (`--since 2h`), and running its coroutine with broker failures turned
into a message and an exit code."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import typer
from aiokafka.errors import KafkaConnectionError, KafkaError
from rich.console import Console
from rich.markup import escape

from schemas.topics import Topics
from services.runtime.catalogue import AgentCatalogue
from services.runtime.errors import ConfigurationError
from services.runtime.host import Settings

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

TenantOption = Annotated[str | None, typer.Option(help="Tenant the goal belongs to (default: $SWITCHBOARD_TENANT, else 'default').")]

Command = TypeVar("Command", bound=Callable[..., None])


def reflowed(*texts: str) -> str:
    """The paragraphs of `texts` (docstrings, say), each on one line.

    Rich help keeps a text's line breaks, so a docstring wrapped for the source breaks its sentences
    mid-line at any other terminal width; one line a paragraph lets rich wrap it to the terminal."""
    paragraphs = (p for text in texts for p in inspect.cleandoc(text).split("\n\n"))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def command(app: typer.Typer, name: str, *notes: str) -> Callable[[Command], Command]:
    """Registers a command of `app` with its docstring, then `notes` (more paragraphs), as help, re-flowed."""

    def register(fn: Command) -> Command:
        app.command(name, help=reflowed(fn.__doc__ or "", *notes))(fn)
        return fn

    return register


def setup_logging(settings: Settings, quiet: bool) -> None:
    level = logging.WARNING if quiet else getattr(logging, settings.platform.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("LiteLLM", "litellm", "httpx", "aiokafka", "LiteLLM Router"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def reader_settings() -> tuple[Settings, Topics]:
    """Settings and topic names of a command that reads the namespace's topics; exit 2 when
    KAFKA_BOOTSTRAP_SERVERS is unset or the agent catalogue is broken."""
    settings = Settings()
    setup_logging(settings, quiet=True)
    try:
        settings.kafka.require()
        topics = Topics(settings.platform.namespace, AgentCatalogue.load(settings.platform.agents_dir).names)
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    return settings, topics


def run_async(coro: Coroutine[Any, Any, Any]) -> int:
    """Runs a command's coroutine; its result is the exit code, and so is a failure it did not expect."""
    try:
        result = asyncio.run(coro)
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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h30m`, `2d`, `1w`; ValueError for anything else."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m, 2h, 1h30m, 1d or 1w")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return timedelta(seconds=seconds)


def parse_when(text: str, now: datetime) -> datetime:
    """A duration back from `now` (`2h`), or an ISO 8601 time (UTC unless it names its zone)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 2h, 1d) nor an ISO time (2025-05-01T12:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))  # not rich: it would wrap long lines


def short(text: str, limit: int = 100) -> str:
    """One line of at most `limit` characters, escaped for rich."""
    flat = " ".join(text.split())
    return escape(flat if len(flat) <= limit else flat[: limit - 1] + "…")
