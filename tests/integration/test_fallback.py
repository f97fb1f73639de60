"""Fallbacks and escalation on the real broker: a goal whose agents fail completes through its
type's fallback and says so; a goal whose type escalates waits for a person, whose answer
completes it."""

from __future__ import annotations

import json

from schemas.budget import BudgetLimits
from schemas.events import (
    AuditRecorded,
    GoalCompleted,
    GoalEscalated,
    GoalFallbackStarted,
    GoalStateChanged,
    GoalSubmitted,
    LLMCallRecorded,
    WorkDeadLettered,
)
from schemas.topics import Topics
from services.runtime.host import Settings
from tests.integration.conftest import EVERY_SERVICE, KINDS, serving
from tests.integration.test_lifecycle import switchboard
from tests.support.kafka import RawProducer, TopicWatch

# Two model calls: the plan and one agent step. The agents need more, so their path fails with
# budget_exceeded, the same way whichever task is refused first.
TIGHT = BudgetLimits(max_steps=2)


async def test_a_goal_whose_agents_fail_completes_through_its_fallback_which_the_answer_names(
    settings: Settings,
) -> None:
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(
        tenant="acme", goal_id="g-fallback", text="What is 12*7 and what is Apache Kafka?", goal_type="arithmetic",
        budget=TIGHT,
    )
    async with (
        serving(EVERY_SERVICE, settings),
        TopicWatch(settings.kafka, [t.progress, t.goals, t.audit, t.llm_calls]) as watch,
        RawProducer(settings.kafka) as producer,
    ):
        await producer.event(t.goals, goal, goal.goal_id, signed=True)
        done: GoalCompleted = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=120)
        assert (done.path, done.fallback) == ("fallback", "arithmetic_answer")
        assert done.answer == "12*7 = 84"
        started: GoalFallbackStarted = await watch.event(GoalFallbackStarted, goal_id=goal.goal_id)
        assert started.reason == "budget_exceeded" and "max_steps" in started.detail
        # The agents' failure is on the record: its work is in a dead-letter topic, with the reason.
        dead: WorkDeadLettered = await watch.event(WorkDeadLettered, goal_id=goal.goal_id)
        assert dead.reason == "budget_exceeded"
        # The fallback ran through the tool executor, allowlisted and audited as its own actor.
        audits = [s.event for s in watch.seen if isinstance(s.event, AuditRecorded) and s.event.goal_id == goal.goal_id]
        ran = [a for a in audits if a.actor == "fallback:arithmetic"]
        assert [(a.action, a.detail["tool"], a.detail["ok"]) for a in ran] == [("tool.executed", "arithmetic_answer", True)]
        # No model answered it: the only model calls are those the budget let the agents make.
        calls = [s.event for s in watch.seen if isinstance(s.event, LLMCallRecorded) and s.event.goal_id == goal.goal_id]
        assert 1 <= len(calls) <= 2 and "answer" not in {c.purpose for c in calls}


async def test_a_fixed_plan_fallback_runs_on_the_memory_service(settings: Settings) -> None:
    """`lookup`'s fallback is one kb_search call, which the memory service runs for the actor
    `fallback:lookup`."""
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(
        tenant=settings.platform.tenant, goal_id="g-lookup", text="What is Apache Kafka?", goal_type="lookup", budget=BudgetLimits(max_steps=1),
    )
    async with (
        serving(EVERY_SERVICE, settings),
        TopicWatch(settings.kafka, [t.progress]) as watch,
        RawProducer(settings.kafka) as producer,
    ):
        await producer.event(t.goals, goal, goal.goal_id, signed=True)
        done: GoalCompleted = await watch.event(GoalCompleted, goal_id=goal.goal_id, timeout=120)
        assert (done.path, done.fallback) == ("fallback", "knowledge-base")
        assert "Kafka" in done.answer and "partition" in done.answer  # the seeded knowledge base's entry


async def test_a_goal_without_a_fallback_escalates_and_a_persons_answer_completes_it(settings: Settings) -> None:
    t = Topics(settings.platform.namespace, KINDS)
    goal = GoalSubmitted(
        tenant=settings.platform.tenant, goal_id="g-escalate", text="What is 12*7 and what is Apache Kafka?",
        goal_type="reviewed", budget=TIGHT,
    )
    async with (
        serving(EVERY_SERVICE, settings),
        TopicWatch(settings.kafka, [t.progress]) as watch,
        RawProducer(settings.kafka) as producer,
    ):
        await producer.event(t.goals, goal, goal.goal_id, signed=True)
        escalated: GoalEscalated = await watch.event(GoalEscalated, goal_id=goal.goal_id, timeout=120)
        assert escalated.reason == "budget_exceeded"
        assert escalated.goal_text == goal.text

        shown = await switchboard(settings, "goal", "status", goal.goal_id, "--json")
        assert json.loads(shown.output)["state"] == "waiting_for_human"

        answered = await switchboard(
            settings, "goal", "answer", goal.goal_id, "84; Kafka is a distributed event log", "--by", "ana",
        )
        assert "is completed (was waiting_for_human)" in answered.output
        done: GoalCompleted = await watch.event(GoalCompleted, goal_id=goal.goal_id)
        assert (done.answer, done.path, done.answered_by) == ("84; Kafka is a distributed event log", "human", "ana")
        changed: GoalStateChanged = await watch.event(GoalStateChanged, goal_id=goal.goal_id)
        assert (changed.action, changed.to_state) == ("answer", "completed")

        again = await switchboard(settings, "goal", "answer", goal.goal_id, "something else", exit_code=1)
        assert "cannot be answered" in again.output
