"""The limits a goal runs under. A submission may ask for lower limits than its tenant's policy."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

LIMIT_NAMES = ("max_steps", "max_tokens", "max_cost_usd", "max_tool_calls", "deadline_s")


class BudgetLimits(BaseModel):
    """Per-goal limits. None means "not asked for" in a submission, "no limit" in a policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int | None = Field(default=None, ge=1)
    """Model calls across the whole goal: planning, every agent step and the final answer."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Input plus output tokens across the goal's model calls."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_tool_calls: int | None = Field(default=None, ge=0)
    deadline_s: float | None = Field(default=None, gt=0)
    """Wall-clock seconds from submission."""

    def above(self, ceiling: BudgetLimits) -> list[str]:
        """The limits this asks for that are higher than `ceiling` allows."""
        over = []
        for name in LIMIT_NAMES:
            asked, allowed = getattr(self, name), getattr(ceiling, name)
            if asked is not None and allowed is not None and asked > allowed:
                over.append(f"{name}={asked} (at most {allowed})")
        return over

    def within(self, ceiling: BudgetLimits, defaults: BudgetLimits) -> BudgetLimits:
        """Each limit: the one asked for, else the default; never above the ceiling."""
        chosen: dict[str, float | None] = {}
        for name in LIMIT_NAMES:
            asked, allowed = getattr(self, name), getattr(ceiling, name)
            value = asked if asked is not None else getattr(defaults, name)
            if value is None or (allowed is not None and value > allowed):
                value = allowed
            chosen[name] = value
        return BudgetLimits.model_validate(chosen)
