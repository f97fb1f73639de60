"""Orchestrator wiring: consumes the goals topic (submissions and task results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory.state import VersionedStore
from schemas.envelope import Envelope
from schemas.events import GoalSubmitted, TaskCompleted, TaskFailed
from services.orchestrator import logic
from services.orchestrator.settings import OrchestratorSettings
from services.runtime.bus import Delivery, Outgoing, Subscription
from services.runtime.host import Runtime
from services.runtime.idempotency import StepLedger
from services.runtime.prompts import PromptLibrary

PROMPTS = Path(__file__).parent / "prompts"


@dataclass
class OrchestratorApp:
    subscriptions: list[Subscription] = field(default_factory=list)

    async def close(self) -> None:
        return None


async def open_service(runtime: Runtime, **_: Any) -> OrchestratorApp:
    settings = OrchestratorSettings()
    prompts = PromptLibrary(PROMPTS)
    deps = logic.OrchestratorDeps(
        llm=runtime.llm,
        ledger=StepLedger(VersionedStore(runtime.redis, logic.GoalState, settings.state_ttl_s)),
        keys=runtime.keys,
        topics=runtime.topics,
        catalogue=runtime.catalogue,
        planner=prompts.latest("planner"),
        editor=prompts.latest("editor"),
        model=settings.model or runtime.settings.llm.default_model,
        max_plan_attempts=settings.max_plan_attempts,
    )

    async def on_goal(event: Envelope, _: Delivery) -> list[Outgoing]:
        assert isinstance(event, GoalSubmitted)
        return await logic.plan_goal(deps, event)

    async def on_result(event: Envelope, _: Delivery) -> list[Outgoing]:
        assert isinstance(event, TaskCompleted | TaskFailed)
        return await logic.record_task_result(deps, event)

    return OrchestratorApp(
        [
            Subscription(
                group=runtime.group("orchestrator"),
                topics=(runtime.topics.goals,),
                handlers={GoalSubmitted: on_goal, TaskCompleted: on_result, TaskFailed: on_result},
            )
        ]
    )
