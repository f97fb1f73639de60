"""Tool executor wiring: consumes the tools topic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.envelope import Envelope
from schemas.events import ToolCallRequested
from services.runtime.bus import Delivery, Outgoing, Subscription
from services.runtime.host import Runtime
from services.runtime.idempotency import SideEffectGuard
from services.tools import logic, registry
from services.tools.settings import ToolsSettings


@dataclass
class ToolsApp:
    subscriptions: list[Subscription] = field(default_factory=list)

    async def close(self) -> None:
        return None


async def open_service(runtime: Runtime, **_: Any) -> ToolsApp:
    settings = ToolsSettings()
    sandbox = settings.sandbox_dir or runtime.settings.platform.data_dir / "sandbox"
    deps = logic.ToolsDeps(
        tools={
            "calculator": registry.calculator,
            "http_get": registry.http_get(
                settings.http_enabled, settings.http_allowed_hosts, settings.http_max_bytes, settings.timeout_s
            ),
            "save_note": registry.save_note(sandbox),
        },
        catalogue=runtime.catalogue,
        guard=SideEffectGuard(runtime.redis, runtime.keys),
        timeout_s=settings.timeout_s,
    )

    async def on_request(event: Envelope, _: Delivery) -> list[Outgoing]:
        assert isinstance(event, ToolCallRequested)
        return await logic.execute(deps, event)

    return ToolsApp(
        [
            Subscription(
                group=runtime.group("tools"),
                topics=(runtime.topics.tools,),
                handlers={ToolCallRequested: on_request},
            )
        ]
    )
