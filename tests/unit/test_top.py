"""`switchboard top`'s numbers: goals in flight, rates over a sliding window, burn per tenant and
dead-letter growth, from what it is shown and when."""

from __future__ import annotations

import pytest

from schemas.events import (
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalPlanned,
    GoalReopened,
    GoalStateChanged,
    GoalSubmitted,
    LLMCallRecorded,
)
from schemas.plan import Plan, PlannedTask
from services.ops.dlq import DeadLetter
from services.ops.top import TopStats


def call(tenant: str, agent: str, tokens: int, cost: float, purpose: str = "step") -> LLMCallRecorded:
    return LLMCallRecorded(
        tenant=tenant, goal_id="g", purpose=purpose, agent=agent, model="m", prompt_version="p", prompt_hash="h",
        messages=[], response={}, input_tokens=tokens - 10, output_tokens=10, cost_usd=cost, latency_ms=1, instance="i",
    )


def letter(topic: str, reason: str) -> DeadLetter:
    return DeadLetter(topic, 0, 0, 0, None, b"not json", {"x-dlq-reason": reason})


def test_rates_are_over_the_window_or_the_time_since_start_when_shorter() -> None:
    stats = TopStats(window_s=30, started=100)
    for n in range(10):
        stats.observe(call("acme", "researcher", 100, 0.01), now=101 + n * 0.5)
    stats.observe(call("acme", "writer", 50, 0.02), now=104)
    stats.observe(call("acme", "orchestrator", 40, 0.0, purpose="plan"), now=104)

    early = stats.snapshot(now=110)  # ten seconds in: rates over those ten
    assert early.window_s == 10
    assert early.steps_per_s == {"researcher": 1.0, "writer": 0.1}  # planning is not a step
    assert early.llm_calls_per_s == pytest.approx(1.2)
    assert early.tokens_per_s == pytest.approx(109.0)
    assert early.cost_per_min == pytest.approx(0.12 / 10 * 60)

    late = stats.snapshot(now=134)  # the window is 104..134: the researcher's calls at 104, 104.5, 105 and 105.5
    assert late.window_s == 30
    assert late.steps_per_s == {"researcher": pytest.approx(4 / 30), "writer": pytest.approx(1 / 30)}
    assert late.llm_calls == 12 and late.tokens == 1_090  # totals since start keep everything

    gone = stats.snapshot(now=200)
    assert gone.steps_per_s == {} and gone.tokens_per_s == 0 and gone.cost_per_min == 0


def test_goals_are_in_flight_from_submission_or_plan_until_their_end_in_whatever_order_topics_are_read() -> None:
    stats = TopStats(window_s=30, started=0)
    plan = Plan(tasks=[PlannedTask(id="r1", kind="researcher", instruction="x")])
    stats.observe(GoalSubmitted(tenant="acme", goal_id="g-1", text="a"), now=1)
    stats.observe(GoalPlanned(tenant="acme", goal_id="g-1", plan=plan, model="m", prompt_version="p"), now=1)
    stats.observe(GoalSubmitted(tenant="beta", goal_id="g-2", text="b"), now=1)
    stats.observe(GoalCompleted(tenant="beta", goal_id="g-3", answer="c"), now=1)  # its end read first ...
    stats.observe(GoalSubmitted(tenant="beta", goal_id="g-3", text="c"), now=2)  # ... then its submission
    assert stats.snapshot(now=3).goals_in_flight == 2

    failed = GoalFailed(tenant="acme", goal_id="g-1", reason="budget_exceeded", figures={"limit": 1, "spent": 1})
    stats.observe(failed, now=4)
    stats.observe(failed, now=4)  # read twice: counted once
    snapshot = stats.snapshot(now=5)
    assert snapshot.goals_in_flight == 1 and snapshot.goals_failed == 1 and snapshot.goals_completed == 1
    assert {t.tenant: (t.in_flight, t.budget_failures) for t in snapshot.tenants} == {"acme": (0, 1), "beta": (1, 0)}

    stats.observe(GoalReopened(tenant="acme", goal_id="g-1", reason="redrive", requested_by="me"), now=6)
    assert stats.snapshot(now=7).goals_in_flight == 2

    # A paused goal is still in flight; a cancelled one is not.
    def moved(goal_id: str, to: str, action: str) -> GoalStateChanged:
        return GoalStateChanged(
            tenant="acme", goal_id=goal_id, from_state="running", to_state=to, action=action, requested_by="me"
        )

    stats.observe(moved("g-1", "paused", "pause"), now=8)
    assert stats.snapshot(now=9).goals_in_flight == 2
    stats.observe(moved("g-1", "cancelled", "cancel"), now=10)
    assert stats.snapshot(now=11).goals_in_flight == 1

    # A goal that escalates waits for a person: not in flight, until it is answered.
    stats.observe(GoalEscalated(tenant="beta", goal_id="g-2", reason="budget_exceeded", goal_text="b"), now=12)
    waiting = stats.snapshot(now=13)
    assert (waiting.goals_in_flight, waiting.goals_waiting_for_human) == (0, 1)
    stats.observe(GoalCompleted(tenant="beta", goal_id="g-2", answer="b", path="human", answered_by="ana"), now=14)
    answered = stats.snapshot(now=15)
    assert (answered.goals_in_flight, answered.goals_waiting_for_human, answered.goals_completed) == (0, 0, 2)


def test_budget_burn_is_cost_per_minute_per_tenant_and_failures_on_a_budget() -> None:
    stats = TopStats(window_s=60, started=0)
    stats.observe(call("acme", "researcher", 100, 0.30), now=10)
    stats.observe(call("acme", "researcher", 100, 0.30), now=20)
    stats.observe(call("beta", "writer", 100, 0.10), now=30)
    stats.observe(GoalFailed(tenant="beta", goal_id="g-9", reason="task_failed:deadline_exceeded"), now=30)
    stats.observe(GoalFailed(tenant="beta", goal_id="g-8", reason="tool_denied"), now=30)

    burn = {t.tenant: t for t in stats.snapshot(now=60).tenants}
    assert burn["acme"].cost_per_min == pytest.approx(0.60) and burn["acme"].spent_usd == pytest.approx(0.60)
    assert burn["acme"].tokens_per_s == pytest.approx(200 / 60)
    assert burn["beta"].cost_per_min == pytest.approx(0.10) and burn["beta"].budget_failures == 1


def test_dead_letter_growth_is_per_topic_and_reason() -> None:
    stats = TopStats(window_s=30, started=0)
    for now in (10, 20, 25):
        stats.observe(letter("sb.tools.dlq", "tool_denied"), now=now)
    stats.observe(letter("sb.agent.researcher.dlq", "budget_exceeded"), now=28)

    growth = {(d.dlq_topic, d.reason): d for d in stats.snapshot(now=30).dead_letters}
    assert growth[("sb.tools.dlq", "tool_denied")].per_min == pytest.approx(6.0)
    assert growth[("sb.agent.researcher.dlq", "budget_exceeded")].per_min == pytest.approx(2.0)

    later = {(d.dlq_topic, d.reason): d for d in stats.snapshot(now=56).dead_letters}  # the window is 26..56
    assert later[("sb.tools.dlq", "tool_denied")].per_min == 0 and later[("sb.tools.dlq", "tool_denied")].added == 3
    assert later[("sb.agent.researcher.dlq", "budget_exceeded")].per_min == pytest.approx(2.0)


def test_snapshot_is_one_json_document() -> None:
    stats = TopStats(window_s=30, started=0)
    stats.observe(call("acme", "researcher", 100, 0.01), now=1)
    doc = stats.snapshot(now=2).to_json()
    assert doc["steps_per_s"] == {"researcher": 0.5} and doc["tenants"][0]["tenant"] == "acme"
    with pytest.raises(ValueError):
        TopStats(window_s=0)
