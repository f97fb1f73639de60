"""What `switchboard top` shows, worked out from the events and dead letters it sees: goals in flight,
steps per second per agent kind, tokens per second and cost per minute, budget burn per tenant and
dead-letter growth. Pure: it is told what it sees and when, so it runs without Kafka."""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict, deque
from dataclasses import asdict, dataclass
from typing import Any

from schemas.envelope import Envelope
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
from services.ops.dlq import DeadLetter

BUDGET_REASONS = frozenset({"budget_exceeded", "deadline_exceeded", "budget_policy"})
"""Goal failure reasons that mean a budget stopped it (also as the cause of `task_failed:<reason>`)."""

_REMEMBERED_EVENTS = 100_000
"""Event ids kept to drop an event seen twice (read again after a consumer is repositioned)."""


@dataclass(frozen=True)
class _Call:
    at: float
    tenant: str
    agent: str
    purpose: str
    tokens: int
    cost_usd: float


@dataclass(frozen=True)
class TenantBurn:
    tenant: str
    in_flight: int
    tokens_per_s: float
    cost_per_min: float
    spent_usd: float
    """Since `top` started."""
    budget_failures: int
    """Goals failed on a budget (or deadline) since `top` started."""


@dataclass(frozen=True)
class DeadLetterGrowth:
    dlq_topic: str
    reason: str
    per_min: float
    added: int
    """Since `top` started."""


@dataclass(frozen=True)
class TopSnapshot:
    window_s: float
    """What the rates are measured over: the sliding window, or the time since the start when shorter."""
    goals_in_flight: int
    goals_waiting_for_human: int
    """Goals whose agents failed and whose type escalates, until a person answers or cancels them
    (not counted in flight)."""
    steps_per_s: dict[str, float]
    """Agent steps (model calls with purpose `step`) per second, by agent kind."""
    llm_calls_per_s: float
    tokens_per_s: float
    cost_per_min: float
    tenants: list[TenantBurn]
    dead_letters: list[DeadLetterGrowth]
    goals_completed: int
    goals_failed: int
    llm_calls: int
    tokens: int
    cost_usd: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TopStats:
    """Counts what it observes; rates over the last `window_s` seconds (times are any monotonic seconds)."""

    def __init__(self, window_s: float = 30.0, started: float = 0.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self.started = started
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._in_flight: dict[str, str] = {}
        """Goal id to tenant, for goals submitted, planned or reopened and not finished since."""
        self._waiting: set[str] = set()
        """Goals that escalated to a person and are not answered or cancelled yet."""
        self._finished: OrderedDict[str, None] = OrderedDict()
        """Goals seen to end (their end may be read before their submission), the latest only."""
        self._calls: deque[_Call] = deque()
        self._letters: deque[tuple[float, str, str]] = deque()
        self._letters_added: Counter[tuple[str, str]] = Counter()
        self._spent: defaultdict[str, float] = defaultdict(float)
        self._budget_failures: Counter[str] = Counter()
        self._tenants: set[str] = set()
        self.goals_completed = 0
        self.goals_failed = 0
        self.llm_calls = 0
        self.tokens = 0
        self.cost_usd = 0.0

    def observe(self, item: Envelope | DeadLetter, now: float) -> None:
        if isinstance(item, DeadLetter):
            self._letters.append((now, item.dlq_topic, item.reason or "(none)"))
            self._letters_added[(item.dlq_topic, item.reason or "(none)")] += 1
            self._prune(now)
            return
        if item.event_id in self._seen:
            return
        self._seen[item.event_id] = None
        if len(self._seen) > _REMEMBERED_EVENTS:
            self._seen.popitem(last=False)
        self._tenants.add(item.tenant)
        match item:
            case GoalSubmitted() | GoalPlanned():
                # Topics are read side by side: a goal's end may be read before its submission.
                if item.goal_id not in self._finished:
                    self._in_flight[item.goal_id] = item.tenant
            case GoalEscalated():
                self._in_flight.pop(item.goal_id, None)
                if item.goal_id not in self._finished:
                    self._waiting.add(item.goal_id)
            case GoalReopened():
                self._finished.pop(item.goal_id, None)
                self._in_flight[item.goal_id] = item.tenant
            case GoalCompleted():
                self._finish(item.goal_id)
                self.goals_completed += 1
            case GoalStateChanged(to_state="cancelled"):
                self._finish(item.goal_id)  # cancelled: no longer in flight (a paused goal still is)
            case GoalFailed():
                self._finish(item.goal_id)
                self.goals_failed += 1
                if item.reason.rpartition(":")[2] in BUDGET_REASONS:
                    self._budget_failures[item.tenant] += 1
            case LLMCallRecorded():
                tokens = item.input_tokens + item.output_tokens
                self._calls.append(_Call(now, item.tenant, item.agent, item.purpose, tokens, item.cost_usd))
                self.llm_calls += 1
                self.tokens += tokens
                self.cost_usd += item.cost_usd
                self._spent[item.tenant] += item.cost_usd
        self._prune(now)

    def _finish(self, goal_id: str) -> None:
        self._in_flight.pop(goal_id, None)
        self._waiting.discard(goal_id)
        self._finished[goal_id] = None
        if len(self._finished) > _REMEMBERED_EVENTS:
            self._finished.popitem(last=False)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._calls and self._calls[0].at < horizon:
            self._calls.popleft()
        while self._letters and self._letters[0][0] < horizon:
            self._letters.popleft()

    def span(self, now: float) -> float:
        """Seconds the rates are measured over: the window, or less while `top` has run for less."""
        return max(0.0, min(self.window_s, now - self.started))

    def snapshot(self, now: float) -> TopSnapshot:
        self._prune(now)
        span = self.span(now)

        def per_s(amount: float) -> float:
            return amount / span if span > 0 else 0.0

        steps = Counter(c.agent for c in self._calls if c.purpose == "step")
        in_flight = Counter(self._in_flight.values())
        tokens_by_tenant: Counter[str] = Counter()
        cost_by_tenant: defaultdict[str, float] = defaultdict(float)
        for c in self._calls:
            tokens_by_tenant[c.tenant] += c.tokens
            cost_by_tenant[c.tenant] += c.cost_usd
        letters = Counter((topic, reason) for _, topic, reason in self._letters)
        return TopSnapshot(
            window_s=span,
            goals_in_flight=len(self._in_flight),
            goals_waiting_for_human=len(self._waiting),
            steps_per_s={kind: per_s(n) for kind, n in sorted(steps.items())},
            llm_calls_per_s=per_s(len(self._calls)),
            tokens_per_s=per_s(sum(c.tokens for c in self._calls)),
            cost_per_min=per_s(sum(c.cost_usd for c in self._calls)) * 60,
            tenants=[
                TenantBurn(
                    tenant=t, in_flight=in_flight[t], tokens_per_s=per_s(tokens_by_tenant[t]),
                    cost_per_min=per_s(cost_by_tenant[t]) * 60, spent_usd=self._spent[t],
                    budget_failures=self._budget_failures[t],
                )
                for t in sorted(self._tenants)
            ],
            dead_letters=[
                DeadLetterGrowth(topic, reason, per_s(letters[(topic, reason)]) * 60, added)
                for (topic, reason), added in sorted(self._letters_added.items())
            ],
            goals_completed=self.goals_completed,
            goals_failed=self.goals_failed,
            llm_calls=self.llm_calls,
            tokens=self.tokens,
            cost_usd=self.cost_usd,
        )
