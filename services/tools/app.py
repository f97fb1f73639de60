"""Tool executor wiring: consumes the tools topic."""

from __future__ import annotations

from functools import partial
from typing import Any

from schemas.events import ToolCallRequested
from services.runtime.bus import Subscription, on
from services.runtime.host import Runtime, ServiceApp
from services.runtime.idempotency import SideEffectGuard
from services.tools import logic, registry
from services.tools.settings import ToolsSettings


async def open_service(runtime: Runtime, **_: Any) -> ServiceApp:
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

    return ServiceApp(
        [
            Subscription(
                group=runtime.group("tools"),
                topics=(runtime.topics.tools,),
                handlers={ToolCallRequested: on(partial(logic.execute, deps))},
            )
        ]
    )
