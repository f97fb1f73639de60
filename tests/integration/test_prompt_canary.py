"""A prompt canary on the real broker: with a 50% researcher rollout, many goals use both
versions, and every call of one goal's researcher tasks uses the version its bucket names."""

from __future__ import annotations

from collections import defaultdict

import pytest

from schemas.events import GoalCompleted, GoalSubmitted, LLMCallRecorded, TaskCompleted
from schemas.topics import Topics
from services.runtime.catalogue import PACKAGED_PROMPTS
from services.runtime.host import ServiceSpec, Settings
from services.runtime.prompts import PromptLibrary, bucket
from tests.integration.conftest import serving
from tests.support.kafka import RawProducer, Seen, TopicWatch

GOALS = [f"g-canary-{i:02d}" for i in range(30)]
ROLLOUT = '{"researcher": {"stable": "v1", "canary": "v2", "percent": 50}}'


def expected_version(goal_id: str) -> str:
    return "researcher.v2" if bucket("researcher", goal_id) < 50 else "researcher.v1"


async def test_a_50_percent_rollout_uses_both_versions_and_keeps_each_goal_on_one(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWITCHBOARD_PROMPT_ROLLOUT", ROLLOUT)
    monkeypatch.setenv("AGENT_RECALL_K", "0")
    assert {expected_version(g) for g in GOALS} == {"researcher.v1", "researcher.v2"}, "the goal ids cover both sides"
    digests = {p.label: p.digest for p in PromptLibrary(PACKAGED_PROMPTS).versions("researcher")}
    t = Topics(settings.platform.namespace, ("researcher", "writer"))
    specs = [
        ServiceSpec("orchestrator"), ServiceSpec("agent", {"kind": "researcher"}), ServiceSpec("agent", {"kind": "writer"}),
        ServiceSpec("tools"), ServiceSpec("memory"),
    ]

    def all_done(seen: list[Seen]) -> bool:
        return len({s.event.goal_id for s in seen if isinstance(s.event, GoalCompleted)}) == len(GOALS)

    async with serving(specs, settings), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        for i, goal_id in enumerate(GOALS):
            await send.event(t.goals, GoalSubmitted(tenant="default", goal_id=goal_id, text=f"What is {i}*7"))
        await watch.until(all_done, timeout=90)
        seen = await watch.caught_up()

    calls: dict[str, list[LLMCallRecorded]] = defaultdict(list)
    for s in seen:
        if isinstance(s.event, LLMCallRecorded) and s.event.agent == "researcher":
            calls[s.event.task_id or ""].append(s.event)
    research = [s.event for s in seen if isinstance(s.event, TaskCompleted) and s.event.kind == "researcher"]
    assert {r.goal_id for r in research} == set(GOALS)
    used: set[str] = set()
    for task in research:
        records = calls[task.task_id or ""]
        assert len(records) == task.steps, f"every model call of {task.task_id} is on the record"
        versions = {r.prompt_version for r in records}
        assert versions == {expected_version(task.goal_id)}, f"{task.task_id}: {versions}"
        assert {r.prompt_hash for r in records} == {digests[expected_version(task.goal_id)]}
        used |= versions
    assert used == {"researcher.v1", "researcher.v2"}
    others = {s.event.prompt_version for s in seen if isinstance(s.event, LLMCallRecorded) and s.event.agent != "researcher"}
    assert others == {"planner.v1", "writer.v1", "editor.v1"}, "prompts outside the rollout stay on their stable version"
