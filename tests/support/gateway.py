"""The HTTP gateway for tests: served by uvicorn on a free loopback port in the test's process, with
the test's settings (so its namespace, real Kafka and real Redis), and SSE reading helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from httpx_sse import aconnect_sse
from pydantic import SecretStr

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.runtime.host import Settings
from services.runtime.metrics import Metrics
from tests.support.kafka import eventually

KEYS = {"key-default": "default", "key-other": "other"}
"""API keys of the tests' gateway, and their tenants. `default` has the seeded knowledge base."""
DEFAULT = {"X-API-Key": "key-default"}
OTHER = {"X-API-Key": "key-other"}


def gateway_settings(**overrides: Any) -> GatewaySettings:
    return GatewaySettings(api_keys={SecretStr(k): t for k, t in KEYS.items()}, **overrides)


@asynccontextmanager
async def running_gateway(settings: Settings, metrics: Metrics | None = None, **overrides: Any) -> AsyncIterator[str]:
    """Serve the gateway until the block ends, counting in `metrics`; yields its base URL."""
    app = create_app(settings, gateway_settings(**overrides), metrics)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    # uvicorn installs signal handlers only in the main thread's run(); serve() here leaves them be.
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), timeout=60, interval=0.05)
        if task.done():
            task.result()  # startup failed: raise why
            raise RuntimeError("the gateway stopped before it started serving")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


@dataclass(frozen=True)
class Frame:
    """One server-sent event as the client received it."""

    id: str
    event: str
    data: dict[str, Any]

    @property
    def event_id(self) -> str:
        return str(self.data["event_id"])


async def read_frames(
    client: httpx.AsyncClient, goal_id: str, *, last_event_id: str | None = None, limit: int | None = None,
    timeout: float = 120.0,
) -> list[Frame]:
    """The goal's events from its stream, until the server ends it (or `limit` frames, then the
    connection is dropped, as a client that goes away does)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    got: list[Frame] = []
    async with asyncio.timeout(timeout):
        async with aconnect_sse(client, "GET", f"/goals/{goal_id}/events", headers=headers) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                got.append(Frame(sse.id, sse.event, json.loads(sse.data)))
                if limit is not None and len(got) >= limit:
                    break
    return got
