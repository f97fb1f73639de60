"""Orchestrator wiring: consumes the goals topic (submissions, task results, lifecycle requests,
the results of fallback calls and people's answers)."""

from __future__ import annotations

from functools import partial
from typing import Any

from memory.state import VersionedStore
from schemas.events import (
    GoalAnswered,
    GoalLifecycleRequested,
    GoalReopened,
    GoalSubmitted,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    WorkDeadLettered,
)
from services.orchestrator import fallback, logic
from services.orchestrator.settings import OrchestratorSettings
from services.runtime.bus import Subscription, on
from services.runtime.host import Runtime, ServiceApp
from services.runtime.idempotency import StepLedger
from services.runtime.prompts import PromptLibrary


async def open_service(runtime: Runtime, **_: Any) -> ServiceApp:
    settings = OrchestratorSettings()
    prompts = PromptLibrary.configured(runtime.settings.platform.agents_dir)
    for name in (logic.PLANNER, logic.EDITOR):
        prompts.rollout(name)  # fail at start-up, not at the first goal, without their files
    deps = logic.OrchestratorDeps(
        llm=runtime.llm,
        ledger=StepLedger(VersionedStore(runtime.redis, logic.GoalState, settings.state_ttl_s)),
        keys=runtime.keys,
        topics=runtime.topics,
        catalogue=runtime.catalogue,
        prompts=prompts,
        model=settings.model or runtime.settings.llm.default_model,
        max_plan_attempts=settings.max_plan_attempts,
        budget=runtime.budget,
        goal_types=runtime.goal_types,
    )
    record_result = on(partial(logic.record_task_result, deps))
    return ServiceApp(
        [
            Subscription(
                group=runtime.group("orchestrator"),
                topics=(runtime.topics.goals,),
                handlers={
                    GoalSubmitted: on(partial(logic.plan_goal, deps)),
                    TaskCompleted: record_result,
                    TaskFailed: record_result,
                    WorkDeadLettered: on(partial(logic.fail_on_dead_letter, deps)),
                    GoalReopened: on(partial(logic.reopen, deps)),
                    GoalLifecycleRequested: on(partial(logic.change_lifecycle, deps)),
                    ToolCallCompleted: on(partial(fallback.fallback_result, deps)),
                    GoalAnswered: on(partial(fallback.answered, deps)),
                },
            )
        ]
    )
