"""Goal budgets, counted atomically in Redis so that they hold across every replica.

Each goal has one Redis hash: its limits, what it has spent, and the calls in flight with the
tokens and cost they reserve. A model call is admitted only while the goal is under every limit,
and, when other calls of the goal are in flight, only if its estimate still fits beside theirs;
so however many replicas work on a goal, spending overshoots a limit by at most one call.
The first limit reached stops the goal: every later admission of any of its tasks is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_result,
    stop_after_delay,
    wait_exponential_jitter,
)

from memory.keys import RedisKeys
from schemas.budget import BudgetLimits
from services.runtime.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    GoalStopped,
    Retryable,
)
from services.runtime.settings import BudgetSettings

log = logging.getLogger("switchboard.budget")

_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS: budget hash, tenant's cost today. ARGV: now, estimated tokens, estimated cost,
# daily cost limit ('' = none). Returns {'ok', tokens reserved, cost reserved}, {'wait'},
# {'stopped', why}, {'unopened'} or {reason, budget, limit, spent}.
_ADMIT = """
local b = KEYS[1]
if redis.call('EXISTS', b) == 0 then return {'unopened'} end
local stopped = redis.call('HGET', b, 'stopped')
if stopped then return {'stopped', stopped} end
local function num(f) local v = redis.call('HGET', b, f); if v then return tonumber(v) end; return nil end
local function over(reason, budget, limit, spent)
  redis.call('HSET', b, 'stopped', budget .. ' limit reached')
  return {reason, budget, tostring(limit), tostring(spent)}
end
local now = tonumber(ARGV[1])
local started, deadline = num('started'), num('lim_deadline_s')
if started and deadline and now - started >= deadline then
  return over('deadline_exceeded', 'deadline_s', deadline, now - started)
end
local steps, tokens, cost = num('steps') or 0, num('tokens') or 0, num('cost') or 0
local lim = num('lim_steps')
if lim and steps >= lim then return over('budget_exceeded', 'max_steps', lim, steps) end
lim = num('lim_tokens')
if lim and tokens >= lim then return over('budget_exceeded', 'max_tokens', lim, tokens) end
lim = num('lim_cost')
if lim and cost >= lim then return over('budget_exceeded', 'max_cost_usd', lim, cost) end
local daily = tonumber(ARGV[4])
if daily then
  local today = tonumber(redis.call('GET', KEYS[2]) or '0')
  if today >= daily then return over('budget_exceeded', 'tenant_daily_cost_usd', daily, today) end
end
local est_t = math.max(tonumber(ARGV[2]), num('max_call_tokens') or 0)
local est_c = math.max(tonumber(ARGV[3]), num('max_call_cost') or 0)
if (num('inflight') or 0) > 0 then
  lim = num('lim_tokens')
  if lim and tokens + (num('res_tokens') or 0) + est_t > lim then return {'wait'} end
  lim = num('lim_cost')
  if lim and cost + (num('res_cost') or 0) + est_c > lim then return {'wait'} end
end
redis.call('HINCRBY', b, 'steps', 1)
redis.call('HINCRBY', b, 'inflight', 1)
redis.call('HINCRBYFLOAT', b, 'res_tokens', est_t)
redis.call('HINCRBYFLOAT', b, 'res_cost', est_c)
return {'ok', tostring(est_t), tostring(est_c)}
"""

# KEYS: budget hash, tenant's cost today. ARGV: reserved tokens, reserved cost, tokens used,
# cost, day ttl, 1 if the call was made (0: it failed and is not counted as a step).
_SETTLE = """
local b = KEYS[1]
redis.call('HINCRBY', b, 'inflight', -1)
redis.call('HINCRBYFLOAT', b, 'res_tokens', -tonumber(ARGV[1]))
redis.call('HINCRBYFLOAT', b, 'res_cost', -tonumber(ARGV[2]))
if ARGV[6] == '0' then redis.call('HINCRBY', b, 'steps', -1); return 0 end
local t, c = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HINCRBY', b, 'tokens', t)
redis.call('HINCRBYFLOAT', b, 'cost', c)
if t > tonumber(redis.call('HGET', b, 'max_call_tokens') or '0') then redis.call('HSET', b, 'max_call_tokens', t) end
if c > tonumber(redis.call('HGET', b, 'max_call_cost') or '0') then redis.call('HSET', b, 'max_call_cost', c) end
if c > 0 then
  redis.call('INCRBYFLOAT', KEYS[2], c)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return 1
"""

# KEYS: budget hash. ARGV: tool calls asked for. Returns {'ok'}, {'stopped', why} or an overrun.
_TOOL_CALLS = """
local b = KEYS[1]
if redis.call('EXISTS', b) == 0 then return {'unopened'} end
local stopped = redis.call('HGET', b, 'stopped')
if stopped then return {'stopped', stopped} end
local used = tonumber(redis.call('HGET', b, 'tool_calls') or '0')
local lim = redis.call('HGET', b, 'lim_tool_calls')
local n = tonumber(ARGV[1])
if lim and used + n > tonumber(lim) then
  redis.call('HSET', b, 'stopped', 'max_tool_calls limit reached')
  return {'budget_exceeded', 'max_tool_calls', lim, tostring(used + n)}
end
redis.call('HINCRBY', b, 'tool_calls', n)
return {'ok'}
"""

_FIELDS = {
    "max_steps": "lim_steps",
    "max_tokens": "lim_tokens",
    "max_cost_usd": "lim_cost",
    "max_tool_calls": "lim_tool_calls",
    "deadline_s": "lim_deadline_s",
}


@dataclass(frozen=True)
class Reservation:
    """An admitted model call: what it reserved, to be settled when it returns."""

    tenant: str
    goal_id: str
    tokens: float
    cost: float


@dataclass(frozen=True)
class BudgetStatus:
    limits: BudgetLimits
    spent: dict[str, float]
    in_flight: int
    stopped: str | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _overrun(reply: list[str], goal_id: str) -> BudgetExceeded:
    reason, budget, limit, spent = reply[0], reply[1], float(reply[2]), float(reply[3])
    if reason == "deadline_exceeded":
        return DeadlineExceeded(
            f"goal {goal_id} passed its deadline: {spent:.1f}s since submission, limit {limit:g}s",
            budget, limit, spent,
        )
    return BudgetExceeded(f"goal {goal_id} reached {budget}: limit {limit:g}, spent {spent:g}", budget, limit, spent)


class BudgetLedger:
    def __init__(self, redis: Redis, keys: RedisKeys, settings: BudgetSettings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._open = redis.register_script(_OPEN)
        self._admit = redis.register_script(_ADMIT)
        self._settle = redis.register_script(_SETTLE)
        self._tool_calls = redis.register_script(_TOOL_CALLS)

    def limits_for(self, tenant: str, asked: BudgetLimits) -> BudgetLimits:
        """The limits a goal runs under. Raises ValueError if it asks for more than its tenant may."""
        ceiling = self.settings.ceiling(tenant)
        over = asked.above(ceiling)
        if over:
            raise ValueError(f"the goal asks for more than tenant {tenant!r} may: {', '.join(over)}")
        return asked.within(ceiling, self.settings.defaults)

    async def open(self, tenant: str, goal_id: str, limits: BudgetLimits, started: datetime) -> bool:
        """Set the goal's limits once; later calls (a redelivery) change nothing."""
        args: list[Any] = [self.settings.ttl_s, "started", started.timestamp()]
        for name, field in _FIELDS.items():
            value = getattr(limits, name)
            if value is not None:
                args += [field, value]
        return bool(await self._open(keys=[self.keys.goal_budget(tenant, goal_id)], args=args))

    def _day_key(self, tenant: str) -> str:
        return self.keys.tenant_cost(tenant, datetime.now(UTC).strftime("%Y%m%d"))

    async def admit(
        self, tenant: str, goal_id: str, est_tokens: int, est_cost: float, wait_s: float = 60.0
    ) -> Reservation:
        """Admit one model call, or raise BudgetExceeded / DeadlineExceeded / GoalStopped.

        While the goal's in-flight calls leave no room for this one, wait (up to `wait_s`) for them
        to settle, then raise Retryable so the message backs off in a retry topic.
        """
        daily = self.settings.daily_cost(tenant)
        keys = [self.keys.goal_budget(tenant, goal_id), self._day_key(tenant)]

        async def attempt() -> list[str]:
            args = [time.time(), est_tokens, est_cost, "" if daily is None else daily]
            reply = [_text(v) for v in await self._admit(keys=keys, args=args)]
            if reply[0] == "unopened":
                await self._open_default(tenant, goal_id)
                return ["wait"]
            return reply

        retrying = AsyncRetrying(
            retry=retry_if_result(lambda reply: reply[0] == "wait"),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
            stop=stop_after_delay(wait_s),
        )
        try:
            reply: list[str] = await retrying(attempt)
        except RetryError as exc:
            raise Retryable(f"goal {goal_id}: calls in flight leave no budget for another; will retry") from exc
        if reply[0] == "ok":
            return Reservation(tenant, goal_id, float(reply[1]), float(reply[2]))
        if reply[0] == "stopped":
            raise GoalStopped(goal_id, reply[1])
        raise _overrun(reply, goal_id)

    async def settle(self, reservation: Reservation, tokens: int, cost: float, made: bool = True) -> None:
        """Count a returned call (made) or give back the reservation of one that failed."""
        await self._settle(
            keys=[self.keys.goal_budget(reservation.tenant, reservation.goal_id), self._day_key(reservation.tenant)],
            args=[reservation.tokens, reservation.cost, tokens, cost, 2 * 86_400, 1 if made else 0],
        )

    async def _open_default(self, tenant: str, goal_id: str) -> None:
        """No orchestrator opened this goal's budget (e.g. it expired): the tenant's defaults apply."""
        log.warning("goal %s has no budget; opening it with the defaults for tenant %s", goal_id, tenant)
        await self.open(tenant, goal_id, self.limits_for(tenant, BudgetLimits()), datetime.now(UTC))

    async def charge_tool_calls(self, tenant: str, goal_id: str, count: int) -> None:
        """Count tool calls about to be sent; raises BudgetExceeded (and sends none) past the limit."""
        key = self.keys.goal_budget(tenant, goal_id)
        reply = [_text(v) for v in await self._tool_calls(keys=[key], args=[count])]
        if reply[0] == "unopened":
            await self._open_default(tenant, goal_id)
            reply = [_text(v) for v in await self._tool_calls(keys=[key], args=[count])]
        if reply[0] == "stopped":
            raise GoalStopped(goal_id, reply[1])
        if reply[0] != "ok":
            raise _overrun(reply, goal_id)

    async def stop(self, tenant: str, goal_id: str, why: str) -> None:
        """Stop the goal: every task's next model call is refused, on every replica."""
        key = self.keys.goal_budget(tenant, goal_id)
        await self.redis.hset(key, "stopped", why)
        await self.redis.expire(key, self.settings.ttl_s)

    async def reopen(self, tenant: str, goal_id: str) -> None:
        """Let a stopped goal run again (a redrive). Its limits and spending are unchanged."""
        await self.redis.hdel(self.keys.goal_budget(tenant, goal_id), "stopped")

    async def status(self, tenant: str, goal_id: str) -> BudgetStatus | None:
        raw = await self.redis.hgetall(self.keys.goal_budget(tenant, goal_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        limits = BudgetLimits.model_validate(
            {name: float(fields[f]) if "." in fields[f] else int(fields[f]) for name, f in _FIELDS.items() if f in fields}
        )
        spent = {
            "steps": float(fields.get("steps", 0)),
            "tokens": float(fields.get("tokens", 0)),
            "cost_usd": float(fields.get("cost", 0)),
            "tool_calls": float(fields.get("tool_calls", 0)),
        }
        return BudgetStatus(limits, spent, int(fields.get("inflight", 0)), fields.get("stopped"))
