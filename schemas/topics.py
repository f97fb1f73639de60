"""Every topic name, built in one place from a configurable namespace."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.tools import TOOL_SPECS

DLQ_SUFFIX = ".dlq"
RETRY_INFIX = ".retry."


@dataclass(frozen=True)
class Topics:
    namespace: str
    agent_kinds: tuple[str, ...]
    retry_levels: int = 3
    """How many retry topics (`<topic>.retry.1` ...) each consumed topic has."""

    @property
    def goals(self) -> str:
        """Orchestrator inbox, keyed by goal_id: submissions and task results."""
        return f"{self.namespace}.goals"

    @property
    def progress(self) -> str:
        """Goal progress for observers, keyed by goal_id: planned, completed, failed."""
        return f"{self.namespace}.progress"

    def agent(self, kind: str) -> str:
        """One agent kind's inbox, keyed by task_id: assignments, tool and memory results."""
        return f"{self.namespace}.agent.{kind}"

    @property
    def tools(self) -> str:
        """Tool executor inbox, keyed by task_id."""
        return f"{self.namespace}.tools"

    @property
    def memory(self) -> str:
        """Memory service inbox, keyed by task_id: recalls and knowledge-base searches."""
        return f"{self.namespace}.memory"

    def executor(self, tool: str) -> str:
        """The inbox of the service that runs `tool`: the memory service's or the tools executor's.
        Raises ValueError for a tool no executor runs (`delegate`: the calling agent handles it)."""
        where = TOOL_SPECS[tool].executor
        if where == "agent":
            raise ValueError(f"{tool!r} is handled by the agent that calls it, not by an executor")
        return self.memory if where == "memory" else self.tools

    @property
    def llm_calls(self) -> str:
        """The record of every model call, keyed by goal_id."""
        return f"{self.namespace}.llm-calls"

    @property
    def approvals(self) -> str:
        """Tool calls waiting for a person, keyed by goal_id: what `switchboard approvals` shows."""
        return f"{self.namespace}.approvals"

    @property
    def audit(self) -> str:
        """The append-only audit trail: tool executions, denials, approval decisions (keyed by goal id)
        and redrives (keyed by the dead-letter record's id)."""
        return f"{self.namespace}.audit"

    @staticmethod
    def is_dlq(topic: str) -> bool:
        return topic.endswith(DLQ_SUFFIX)

    @staticmethod
    def dlq(topic: str) -> str:
        return Topics.origin(topic) + DLQ_SUFFIX

    @staticmethod
    def retry(topic: str, level: int) -> str:
        """Where a message of `topic` waits out its `level`-th backoff."""
        return f"{Topics.origin(topic)}{RETRY_INFIX}{level}"

    @staticmethod
    def origin(topic: str) -> str:
        """The topic a retry topic belongs to (a work topic is its own origin)."""
        base, infix, level = topic.rpartition(RETRY_INFIX)
        return base if infix and level.isdigit() else topic

    def with_retries(self, topics: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """The topics plus their retry topics: what a consumer group subscribes to."""
        return tuple(topics) + tuple(self.retry(t, n) for t in topics for n in range(1, self.retry_levels + 1))

    def work_topics(self) -> list[str]:
        """Every topic that carries a goal's events (not dead-letter topics)."""
        return [
            self.goals,
            self.progress,
            *(self.agent(k) for k in self.agent_kinds),
            self.tools,
            self.memory,
            self.llm_calls,
        ]

    def dlq_topics(self) -> list[str]:
        """The dead-letter topic of every topic a consumer group reads."""
        return [self.dlq(t) for t in self.work_topics()]

    def all_topics(self) -> list[str]:
        work = self.work_topics()
        return list(self.with_retries(work)) + self.dlq_topics() + [self.audit, self.approvals]
