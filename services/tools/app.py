"""Tool executor wiring: consumes the tools topic; refuses tool requests that are not signed."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from schemas.events import ToolCallRequested
from services.runtime.bus import Subscription, on
from services.runtime.host import Runtime, ServiceApp
from services.runtime.idempotency import SideEffectGuard
from services.tools import logic, registry
from services.tools.limits import ToolLimiter
from services.tools.redaction import Redactor, install_log_redaction
from services.tools.settings import ToolsSettings

CLAIM_MARGIN_S = 30


async def open_service(runtime: Runtime, **_: Any) -> ServiceApp:
    settings = ToolsSettings.from_env()
    sandbox = settings.sandbox_dir or runtime.settings.platform.data_dir / "sandbox"
    tools = {
        "calculator": registry.calculator(),
        "http_get": registry.http_get(
            settings.http_enabled,
            settings.http_allowed_hosts,
            settings.http_max_bytes,
            settings.limits_for("http_get").timeout_s,
            settings.http_headers,
        ),
        "save_note": registry.save_note(sandbox),
    }
    limiters = {name: ToolLimiter(name, settings.limits_for(name)) for name in tools}
    # A side effect's claim must outlive its slowest attempt, or a duplicate could run it too.
    longest = max(limiter.limits.timeout_s for limiter in limiters.values())
    redact = Redactor(settings.secrets())
    deps = logic.ToolsDeps(
        tools=tools,
        limiters=limiters,
        catalogue=runtime.catalogue,
        guard=SideEffectGuard(runtime.redis, runtime.keys, claim_ttl_s=max(60, math.ceil(longest) + CLAIM_MARGIN_S)),
        audit_topic=runtime.topics.audit,
        redact=redact,
    )
    uninstall_redaction = install_log_redaction(redact)

    async def close() -> None:
        uninstall_redaction()

    return ServiceApp(
        [
            Subscription(
                group=runtime.group("tools"),
                topics=(runtime.topics.tools,),
                handlers={ToolCallRequested: on(partial(logic.execute, deps))},
                require_signature=frozenset({ToolCallRequested}),
            )
        ],
        on_close=close,
    )
