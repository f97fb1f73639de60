"""Tool executor wiring: consumes the tools topic; refuses tool requests that are not signed."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from functools import partial
from typing import Any

from schemas.envelope import Envelope
from schemas.events import ApprovalDecided, ToolCallRequested
from services.runtime.approvals import ApprovalBook
from services.runtime.bus import Delivery, Outgoing, Producer, Subscription, on
from services.runtime.host import Runtime, ServiceApp
from services.runtime.idempotency import SideEffectGuard
from services.runtime.pipeline import TRACEPARENT
from services.runtime.signing import event_headers
from services.runtime.tracecontext import child_traceparent
from services.runtime.tracing import current_traceparent
from services.tools import logic, registry
from services.tools.limits import ToolLimiter
from services.tools.redaction import Redactor, install_log_redaction
from services.tools.fallbacks import FALLBACK_FUNCTIONS
from services.tools.settings import ToolsSettings

CLAIM_MARGIN_S = 30
log = logging.getLogger("switchboard.tools")


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
        **{name: make() for name, make in FALLBACK_FUNCTIONS.items()},
    }
    limiters = {name: ToolLimiter(name, settings.limits_for(name), metrics=runtime.metrics) for name in tools}
    # A side effect's claim must outlive its slowest attempt, or a duplicate could run it too.
    longest = max(limiter.limits.timeout_s for limiter in limiters.values())
    redact = Redactor(settings.secrets())
    deps = logic.ToolsDeps(
        tools=tools,
        limiters=limiters,
        catalogue=runtime.catalogue,
        goal_types=runtime.goal_types,
        guard=SideEffectGuard(runtime.redis, runtime.keys, claim_ttl_s=max(60, math.ceil(longest) + CLAIM_MARGIN_S)),
        audit_topic=runtime.topics.audit,
        redact=redact,
        approvals=ApprovalBook(runtime.redis, runtime.keys),
        needs_approval=settings.needs_approval,
        approval_timeout_s=settings.approval_timeout_s,
        approvals_topic=runtime.topics.approvals,
        tracing=runtime.tracing,
        replay=runtime.replay,
    )
    uninstall_redaction = install_log_redaction(redact)

    async def close() -> None:
        uninstall_redaction()

    async def execute(event: Envelope, delivery: Delivery) -> list[Outgoing]:
        assert isinstance(event, ToolCallRequested)
        # A decision made later (by a person, or the sweeper) continues the trace under this step.
        return await logic.execute(deps, event, traceparent=current_traceparent() or delivery.headers.get(TRACEPARENT))

    async def deny_expired(producer: Producer) -> None:
        """Every approval whose time ran out is denied, once, by whichever replica claims it."""
        assert deps.approvals is not None
        while True:
            try:
                for approval in await deps.approvals.claim_expired(time.time()):
                    timeout = ApprovalDecided(
                        **approval.request.caused(), approval_id=approval.approval_id, approved=False,
                        decided_by="timeout", reason=f"not decided within {settings.approval_timeout_s:g}s",
                    )
                    value = timeout.to_bytes()
                    headers = event_headers(timeout, value, runtime.signer, child_traceparent(approval.traceparent))
                    key = (approval.request.task_id or approval.request.goal_id).encode()
                    await producer.send(runtime.topics.tools, key, value, headers)
            except Exception:  # the sweep runs again on the next tick; a claimed approval is lost only if Kafka is down
                log.exception("could not deny expired approvals; trying again in %.0fs", settings.approval_sweep_s)
            await asyncio.sleep(settings.approval_sweep_s)

    return ServiceApp(
        [
            Subscription(
                group=runtime.group("tools"),
                topics=(runtime.topics.tools,),
                handlers={
                    ToolCallRequested: execute,
                    ApprovalDecided: on(partial(logic.decide, deps)),
                },
                # A forged decision must not approve a call any more than a forged request may run one.
                require_signature=frozenset({ToolCallRequested, ApprovalDecided}),
            )
        ],
        on_close=close,
        background=[deny_expired] if settings.needs_approval else [],
    )
