"""Goal budgets: limits chosen within the tenant's policy, counted atomically, stopping the goal."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.budget import BudgetLimits
from services.runtime.budget import BudgetLedger
from services.runtime.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    GoalStopped,
    Retryable,
)
from services.runtime.settings import BudgetSettings, TenantPolicy


def ledger(redis: Redis, keys: RedisKeys, **settings: object) -> BudgetLedger:
    return BudgetLedger(redis, keys, BudgetSettings.model_validate(settings))


def test_a_goal_gets_the_defaults_lowered_by_its_submission_and_capped_by_its_tenant(redis: Redis) -> None:
    settings = BudgetSettings(
        max_tokens=10_000, max_cost_usd=5, tenant_policies={"acme": TenantPolicy(max_cost_usd=2, max_steps=30)}
    )
    budget = BudgetLedger(redis, RedisKeys("unit"), settings)
    limits = budget.limits_for("acme", BudgetLimits(max_tokens=500))
    assert limits.max_tokens == 500  # asked for less than the default
    assert limits.max_cost_usd == 2  # the default, capped by the policy
    assert limits.max_steps == 30
    assert limits.max_tool_calls == 100  # the policy leaves it out: the default applies ...
    assert budget.limits_for("acme", BudgetLimits(max_tool_calls=500)).max_tool_calls == 500  # ... with no ceiling
    assert budget.limits_for("other", BudgetLimits()).max_cost_usd == 5


def test_a_goal_that_asks_for_more_than_its_tenant_may_is_refused_with_the_reason(redis: Redis) -> None:
    settings = BudgetSettings(tenant_policies={"acme": TenantPolicy(max_cost_usd=2)})
    budget = BudgetLedger(redis, RedisKeys("unit"), settings)
    with pytest.raises(ValueError, match=r"max_cost_usd=10.0 \(at most 2.0\)"):
        budget.limits_for("acme", BudgetLimits(max_cost_usd=10))


def test_tenant_policies_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_BUDGET_TENANT_POLICIES", '{"acme": {"max_tokens": 900, "daily_cost_usd": 3}}')
    settings = BudgetSettings()
    assert settings.ceiling("acme").max_tokens == 900 and settings.daily_cost("acme") == 3
    monkeypatch.setenv("SWITCHBOARD_BUDGET_TENANT_POLICIES", "{not json")
    with pytest.raises(ValueError, match="TENANT_POLICIES is not JSON"):
        BudgetSettings()


async def test_the_call_that_reaches_the_token_limit_is_the_last_one(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys)
    await budget.open("acme", "g1", BudgetLimits(max_tokens=1_000), datetime.now(UTC))
    spent = 0
    calls = 0
    with pytest.raises(BudgetExceeded) as caught:
        while True:
            reservation = await budget.admit("acme", "g1", est_tokens=300, est_cost=0)
            calls += 1
            spent += 400
            await budget.settle(reservation, tokens=400, cost=0)
    assert calls == 3  # 0, 400, 800 were under the limit; 1,200 is not
    assert caught.value.reason == "budget_exceeded" and caught.value.budget == "max_tokens"
    assert caught.value.figures == {"limit": 1_000, "spent": 1_200}
    status = await budget.status("acme", "g1")
    assert status is not None and status.spent["tokens"] == spent and status.stopped == "max_tokens limit reached"
    with pytest.raises(GoalStopped):  # every later call of any task of the goal
        await budget.admit("acme", "g1", est_tokens=1, est_cost=0)


async def test_calls_in_flight_reserve_their_estimate_so_concurrent_calls_cannot_all_overshoot(
    redis: Redis, keys: RedisKeys
) -> None:
    budget = ledger(redis, keys)
    await budget.open("acme", "g1", BudgetLimits(max_tokens=1_000), datetime.now(UTC))
    first = await budget.admit("acme", "g1", est_tokens=600, est_cost=0)
    # A second call of the same size does not fit beside the first: it waits for it to settle.
    second = asyncio.create_task(budget.admit("acme", "g1", est_tokens=600, est_cost=0, wait_s=10))
    with pytest.raises(TimeoutError):  # still waiting while the first is in flight
        await asyncio.wait_for(asyncio.shield(second), timeout=0.3)
    await budget.settle(first, tokens=1_050, cost=0)
    with pytest.raises(BudgetExceeded):  # the first used it all up: the second never runs
        await second
    status = await budget.status("acme", "g1")
    assert status is not None and status.spent["steps"] == 1


async def test_a_call_that_waits_too_long_for_room_backs_off_through_the_retry_topics(
    redis: Redis, keys: RedisKeys
) -> None:
    budget = ledger(redis, keys)
    await budget.open("acme", "g1", BudgetLimits(max_tokens=1_000), datetime.now(UTC))
    await budget.admit("acme", "g1", est_tokens=600, est_cost=0)
    with pytest.raises(Retryable, match="calls in flight leave no budget"):
        await budget.admit("acme", "g1", est_tokens=600, est_cost=0, wait_s=0.3)


async def test_tool_calls_past_the_limit_are_refused_before_any_is_sent(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys)
    await budget.open("acme", "g1", BudgetLimits(max_tool_calls=3), datetime.now(UTC))
    await budget.charge_tool_calls("acme", "g1", 2)
    with pytest.raises(BudgetExceeded) as caught:
        await budget.charge_tool_calls("acme", "g1", 2)
    assert caught.value.figures == {"limit": 3, "spent": 4}
    status = await budget.status("acme", "g1")
    assert status is not None and status.spent["tool_calls"] == 2


async def test_a_goal_past_its_deadline_gets_no_more_model_calls(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys)
    submitted = datetime.now(UTC) - timedelta(seconds=30)
    await budget.open("acme", "g1", BudgetLimits(deadline_s=20), submitted)
    with pytest.raises(DeadlineExceeded) as caught:
        await budget.admit("acme", "g1", est_tokens=1, est_cost=0)
    assert caught.value.reason == "deadline_exceeded" and caught.value.limit == 20 and caught.value.spent >= 30


async def test_a_tenant_over_its_daily_cost_stops_its_goals(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys, tenant_daily_cost_usd=1.0)
    for goal in ("g1", "g2"):
        await budget.open("acme", goal, BudgetLimits(), datetime.now(UTC))
    reservation = await budget.admit("acme", "g1", est_tokens=10, est_cost=0.5)
    await budget.settle(reservation, tokens=10, cost=1.2)
    with pytest.raises(BudgetExceeded) as caught:
        await budget.admit("acme", "g2", est_tokens=10, est_cost=0.5)
    assert caught.value.budget == "tenant_daily_cost_usd" and caught.value.figures == {"limit": 1.0, "spent": 1.2}


async def test_a_goal_nobody_opened_runs_under_the_tenant_defaults(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys, max_steps=2)
    for _ in range(2):
        await budget.settle(await budget.admit("acme", "g1", est_tokens=1, est_cost=0), tokens=1, cost=0)
    with pytest.raises(BudgetExceeded, match="max_steps"):
        await budget.admit("acme", "g1", est_tokens=1, est_cost=0)


async def test_a_failed_call_gives_back_its_reservation_and_is_not_a_step(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys)
    await budget.open("acme", "g1", BudgetLimits(max_steps=1), datetime.now(UTC))
    await budget.settle(await budget.admit("acme", "g1", est_tokens=5, est_cost=0), tokens=0, cost=0, made=False)
    await budget.settle(await budget.admit("acme", "g1", est_tokens=5, est_cost=0), tokens=5, cost=0)
    status = await budget.status("acme", "g1")
    assert status is not None and status.spent["steps"] == 1 and status.in_flight == 0


async def test_a_reopened_goal_runs_again_within_the_same_limits(redis: Redis, keys: RedisKeys) -> None:
    budget = ledger(redis, keys)
    await budget.open("acme", "g1", BudgetLimits(max_steps=5), datetime.now(UTC))
    await budget.stop("acme", "g1", "task r1 failed")
    with pytest.raises(GoalStopped, match="task r1 failed"):
        await budget.admit("acme", "g1", est_tokens=1, est_cost=0)
    await budget.reopen("acme", "g1")
    await budget.admit("acme", "g1", est_tokens=1, est_cost=0)
