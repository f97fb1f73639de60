"""Response caching in the LLM gateway: LiteLLM's in-process cache, the offline model counting its
turns. A hit calls no model, costs nothing, and records what it saved."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from memory.keys import RedisKeys
from schemas.budget import BudgetLimits
from schemas.events import GoalSubmitted
from services.runtime.budget import BudgetLedger
from services.runtime.catalogue import AgentCatalogue
from services.runtime.llm import Completion, LLMGateway, response_cache
from services.runtime.offline_model import ToolCall, Turn
from services.runtime.prompts import Prompt
from services.runtime.settings import BudgetSettings, LLMSettings

GOAL = GoalSubmitted(tenant="acme", goal_id="g1", text="What is 12*7")
V1 = Prompt("researcher", "v1", "You research.")
V2 = Prompt("researcher", "v2", "You research.")
MESSAGES = [{"role": "system", "content": "You research."}, {"role": "user", "content": "What is 12*7"}]
TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]


class CountingScript:
    """The offline model's scripted form, counting the turns it was asked for."""

    def __init__(self) -> None:
        self.turns = 0

    def __call__(self, messages: list[dict[str, Any]], tools: list[str]) -> Turn:
        self.turns += 1
        return Turn(tool_calls=[ToolCall("calculator", {"expression": "12*7"})])


def gateway(script: CountingScript, cached: bool = True, budget: BudgetLedger | None = None) -> LLMGateway:
    return LLMGateway(
        LLMSettings(offline_cost_per_1k_tokens=0.5), {"offline/default"}, "test:1", script=script, budget=budget,
        cache=response_cache(None, "unit") if cached else None,
    )


async def call(llm: LLMGateway, prompt: Prompt = V1, cache: bool = True) -> Completion:
    return await llm.complete(
        model="offline/default", prompt=prompt, messages=MESSAGES, purpose="step", agent="researcher",
        cause=GOAL, tools=TOOLS, cache=cache,
    )


async def test_a_repeated_call_is_answered_from_the_cache_with_what_it_saved() -> None:
    script = CountingScript()
    llm = gateway(script)
    first, second = await call(llm), await call(llm)
    assert script.turns == 1 and llm.model_calls == 1, "the second call reached no model"
    assert not first.record.cache_hit and first.record.saved_tokens == 0
    assert second.record.cache_hit
    paid = first.record.input_tokens + first.record.output_tokens
    assert paid > 0 and first.record.cost_usd > 0
    assert second.record.saved_tokens == paid
    assert second.record.saved_cost_usd == first.record.cost_usd
    assert (second.record.input_tokens, second.record.output_tokens, second.record.cost_usd) == (0, 0, 0.0)
    assert second.assistant_message == first.assistant_message, "the same answer, tool call ids and all"
    assert [(c.name, c.raw_arguments) for c in second.tool_calls] == [(c.name, c.raw_arguments) for c in first.tool_calls]


async def test_another_prompt_version_with_the_same_messages_misses() -> None:
    script = CountingScript()
    llm = gateway(script)
    await call(llm, V1)
    other = await call(llm, V2)
    assert not other.record.cache_hit
    assert script.turns == 2 and llm.model_calls == 2


async def test_another_tenant_with_the_same_messages_misses() -> None:
    script = CountingScript()
    llm = gateway(script)
    await call(llm)
    theirs = await llm.complete(
        model="offline/default", prompt=V1, messages=MESSAGES, purpose="step", agent="researcher",
        cause=GOAL.model_copy(update={"tenant": "beta"}), tools=TOOLS, cache=True,
    )
    assert not theirs.record.cache_hit and theirs.record.saved_cost_usd == 0  # nothing of acme's shows
    assert script.turns == 2


async def test_caching_is_off_unless_the_call_and_the_agent_kind_ask_for_it() -> None:
    assert not any(kind.cache for kind in AgentCatalogue.load().kinds.values()), "packaged kinds leave it off"
    script = CountingScript()
    llm = gateway(script)
    assert llm.cache is not None
    await call(llm, cache=False)
    again = await call(llm, cache=False)
    assert not again.record.cache_hit and script.turns == 2
    uncached = gateway(CountingScript(), cached=False)
    await call(uncached)
    assert not (await call(uncached)).record.cache_hit and uncached.model_calls == 2, "a gateway without a cache"


async def test_a_hit_costs_the_goal_budget_nothing(redis: Redis, keys: RedisKeys) -> None:
    ledger = BudgetLedger(redis, keys, BudgetSettings())
    await ledger.open(GOAL.tenant, GOAL.goal_id, BudgetLimits(), datetime.now(UTC))
    llm = gateway(CountingScript(), budget=ledger)
    first = await call(llm)
    spent = await ledger.status(GOAL.tenant, GOAL.goal_id)
    assert spent is not None
    await call(llm)
    after = await ledger.status(GOAL.tenant, GOAL.goal_id)
    assert after is not None and after.spent == spent.spent and after.in_flight == 0
    assert after.spent["tokens"] == first.record.input_tokens + first.record.output_tokens
