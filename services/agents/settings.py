"""Agent settings (env prefix AGENT_)."""

from pydantic import Field
from pydantic_settings import BaseSettings

from services.runtime.settings import settings_config


class AgentSettings(BaseSettings):
    model_config = settings_config("AGENT_")

    kind: str = "researcher"
    model: str | None = None
    """Overrides the kind's model (any LiteLLM model string)."""
    max_steps: int = Field(default=8, ge=1)
    """Model calls one task may make before it fails; the goal's budget (SWITCHBOARD_BUDGET_*)
    limits the whole goal across its tasks."""
    max_invalid_outputs: int = Field(default=2, ge=0)
    recall_k: int = Field(default=3, ge=0, le=50)
    tool_output_chars: int = Field(default=4_000, ge=100)
    context_tokens: int = Field(default=3_000, ge=256)
    """Token budget of the context of one model call: the task, the latest step, the results it
    depends on, recalled memories and a summary of the older steps (services/agents/context.py).
    The system prompt, the task and the latest step are sent even when they alone exceed it."""
    checkpoint_ttl_s: int = 7 * 86_400
    loop_repeats: int = Field(default=3, ge=2)
    """The same tool with the same arguments this many times in one task stops it as runaway."""
    loop_stale_steps: int = Field(default=3, ge=1)
    """This many steps in a row that bring back only results already seen stop it as runaway."""
    delegation_max_depth: int = Field(default=2, ge=0, le=10)
    """How deep subtasks may nest: a planned task is depth 0, what it delegates depth 1. A task at
    this depth is refused a `delegate` call. 0 turns delegation off. Set the same on every kind."""
    delegation_max_fanout: int = Field(default=3, ge=0)
    """Subtasks one task may delegate in all (over all its steps); one more is refused."""
