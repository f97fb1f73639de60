"""Response caching on real Kafka and Redis: a goal asked again is answered by its cached steps
without calling the model, in the agent kind that switched caching on, and only there."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from schemas.events import GoalCompleted, GoalSubmitted, LLMCallRecorded
from schemas.topics import Topics
from services.runtime.catalogue import PACKAGED_KINDS
from services.runtime.host import Settings
from services.runtime.offline_model import Turn, default_turn
from tests.integration.conftest import EVERY_SERVICE, KINDS, serving
from tests.support.kafka import RawProducer, TopicWatch

TEXT = "What is 12*7 and what is Apache Kafka?"


class CountingModel:
    """The offline model's default turns, counted by the agent kind that asked (told apart by the
    tools it offers: only the writer may save a note, only a researcher may calculate)."""

    def __init__(self) -> None:
        self.turns = {"researcher": 0, "writer": 0, "other": 0}

    def __call__(self, messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        kind = "writer" if "save_note" in tools else "researcher" if "calculator" in tools else "other"
        self.turns[kind] += 1
        return default_turn(messages, tools)


def cached_researchers(settings: Settings, tmp_path: Path) -> Settings:
    """The packaged catalogue with `cache = true` on the researcher kind only."""
    kinds = tmp_path / "kinds"
    kinds.mkdir()
    for packaged in PACKAGED_KINDS.glob("*.toml"):
        shutil.copy(packaged, kinds / packaged.name)
    researcher = kinds / "researcher.toml"
    researcher.write_text(researcher.read_text() + "cache = true\n")
    return replace(settings, platform=settings.platform.model_copy(update={"agents_dir": kinds}))


async def test_a_repeated_goal_makes_no_model_calls_for_its_cached_steps(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_RECALL_K", "0")  # the first goal's memories must not change the second's messages
    settings = cached_researchers(settings, tmp_path)
    t = Topics(settings.platform.namespace, KINDS)
    model = CountingModel()
    records: dict[str, list[LLMCallRecorded]] = {}
    turns: dict[str, dict[str, int]] = {}
    async with serving(EVERY_SERVICE, settings, model), TopicWatch(settings.kafka, t.work_topics()) as watch, RawProducer(settings.kafka) as send:
        for goal_id in ("g-first", "g-again"):
            before = dict(model.turns)
            await send.event(t.goals, GoalSubmitted(tenant="default", goal_id=goal_id, text=TEXT))
            done = await watch.event(GoalCompleted, goal_id=goal_id, timeout=90)
            assert "84" in done.answer
            turns[goal_id] = {k: model.turns[k] - before[k] for k in model.turns}
            # Every call of the first goal reached the model; the second makes as many calls.
            count = sum(turns["g-first"].values())
            seen = await watch.events(LLMCallRecorded, count, goal_id=goal_id)
            records[goal_id] = sorted(seen, key=lambda r: r.ts)

    first = [r for r in records["g-first"] if r.agent == "researcher"]
    again = [r for r in records["g-again"] if r.agent == "researcher"]
    assert first and len(again) == len(first)
    assert not any(r.cache_hit for r in first), "the first goal paid for every researcher step"
    assert turns["g-first"]["researcher"] == len(first)
    assert all(r.cache_hit for r in again), [(r.step_id, r.cache_hit) for r in again]
    assert turns["g-again"]["researcher"] == 0, "no model call for the cached researcher steps"
    assert sum(r.saved_tokens for r in again) == sum(r.input_tokens + r.output_tokens for r in first) > 0
    assert all(r.input_tokens == r.output_tokens == 0 and r.cost_usd == 0 for r in again)

    writer = [r for r in records["g-again"] if r.agent == "writer"]
    assert writer and not any(r.cache_hit for r in writer), "the writer's kind leaves caching off"
    assert turns["g-again"]["writer"] == len(writer) > 0
