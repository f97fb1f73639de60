"""Redis key names, namespaced by deployment namespace and tenant, built in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    namespace: str

    @property
    def pattern(self) -> str:
        """Every key of the namespace, as a SCAN pattern."""
        return f"sb:{self.namespace}:*"

    def _tenant(self, tenant: str) -> str:
        return f"sb:{self.namespace}:t:{tenant}"

    def goal_state(self, tenant: str, goal_id: str) -> str:
        return f"{self._tenant(tenant)}:goal:{goal_id}:state"

    def goal_stream(self, tenant: str, goal_id: str) -> str:
        return f"{self._tenant(tenant)}:goal:{goal_id}:events"

    def task_checkpoint(self, tenant: str, task_id: str) -> str:
        return f"{self._tenant(tenant)}:task:{task_id}:checkpoint"

    def idempotency(self, tenant: str, digest: str) -> str:
        return f"{self._tenant(tenant)}:idem:{digest}"

    def goal_budget(self, tenant: str, goal_id: str) -> str:
        return f"{self._tenant(tenant)}:goal:{goal_id}:budget"

    def tenant_cost(self, tenant: str, day: str) -> str:
        """What a tenant spent on one UTC day (YYYYMMDD)."""
        return f"{self._tenant(tenant)}:cost:{day}"

    def approval(self, tenant: str, approval_id: str) -> str:
        return f"{self._tenant(tenant)}:approval:{approval_id}"

    def memory_write_lock(self, tenant: str) -> str:
        """Held while one curated write to the tenant's semantic memory decides and writes."""
        return f"{self._tenant(tenant)}:memory:write-lock"

    def served_memories(self, tenant: str, task_id: str) -> str:
        """The memory ids a task was shown (recall, kb_search): its result must not re-add them."""
        return f"{self._tenant(tenant)}:task:{task_id}:served"

    def task_brief(self, tenant: str, task_id: str) -> str:
        """A task's instruction, kept so its outcome or failure lesson can say what was asked."""
        return f"{self._tenant(tenant)}:task:{task_id}:brief"

    def gateway_goal(self, tenant: str, goal_id: str) -> str:
        """A goal the HTTP gateway accepted, so that it reads as `submitted` (not unknown) until
        the orchestrator stores the goal's state."""
        return f"{self._tenant(tenant)}:goal:{goal_id}:submission"

    def pending_approvals(self) -> str:
        """Every tenant's undecided approvals, scored by when they expire (`<tenant>/<id>`)."""
        return f"sb:{self.namespace}:approvals:pending"
