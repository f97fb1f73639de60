"""Agent wiring: one consumer group per agent kind, on that kind's inbox topic."""

from __future__ import annotations

from functools import partial
from typing import Any

from memory.state import VersionedStore
from schemas.events import MemoryRecallCompleted, TaskAssigned, ToolCallCompleted
from services.agents import logic
from services.agents.delegation import DelegationPolicy
from services.agents.runaway import RunawayLimits
from services.agents.settings import AgentSettings
from services.runtime.bus import Subscription, on
from services.runtime.host import Runtime, ServiceApp
from services.runtime.idempotency import StepLedger
from services.runtime.prompts import PromptLibrary


async def open_service(runtime: Runtime, kind: str | None = None, model: str | None = None, **_: Any) -> ServiceApp:
    settings = AgentSettings()
    agent_kind = runtime.catalogue.get(kind or settings.kind)
    # A custom catalogue (SWITCHBOARD_AGENTS_DIR) may ship its prompt files beside its kinds.
    prompts = PromptLibrary.configured(runtime.settings.platform.agents_dir)
    prompts.rollout(agent_kind.prompt)  # fail at start-up, not at the first task, without its file
    deps = logic.AgentDeps(
        kind=agent_kind,
        model=model or settings.model or agent_kind.model,
        prompts=prompts,
        llm=runtime.llm,
        ledger=StepLedger(VersionedStore(runtime.redis, logic.TaskCheckpoint, settings.checkpoint_ttl_s)),
        keys=runtime.keys,
        topics=runtime.topics,
        max_steps=settings.max_steps,
        max_invalid_outputs=settings.max_invalid_outputs,
        recall_k=settings.recall_k,
        tool_output_chars=settings.tool_output_chars,
        context_tokens=settings.context_tokens,
        budget=runtime.budget,
        runaway=RunawayLimits(repeats=settings.loop_repeats, stale_steps=settings.loop_stale_steps),
        delegation=DelegationPolicy(
            max_depth=settings.delegation_max_depth,
            max_fanout=settings.delegation_max_fanout,
            targets=tuple((k, runtime.catalogue.get(k).description) for k in agent_kind.delegates_to),
        ),
    )

    return ServiceApp(
        [
            Subscription(
                group=runtime.group(f"agent.{agent_kind.name}"),
                topics=(runtime.topics.agent(agent_kind.name),),
                handlers={
                    TaskAssigned: on(partial(logic.start_task, deps)),
                    MemoryRecallCompleted: on(partial(logic.resume_with_memories, deps)),
                    ToolCallCompleted: on(partial(logic.resume_with_tool_result, deps)),
                },
                agent=agent_kind.name,
            )
        ]
    )
