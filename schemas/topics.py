"""Every topic name, built in one place from a configurable namespace."""

from __future__ import annotations

from dataclasses import dataclass

DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class Topics:
    namespace: str
    agent_kinds: tuple[str, ...]

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

    @property
    def llm_calls(self) -> str:
        """The record of every model call, keyed by goal_id."""
        return f"{self.namespace}.llm-calls"

    @staticmethod
    def dlq(topic: str) -> str:
        return topic + DLQ_SUFFIX

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

    def all_topics(self) -> list[str]:
        work = self.work_topics()
        return work + [self.dlq(t) for t in work]
