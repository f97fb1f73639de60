"""A goal's plan: tasks with dependencies, validated so that any accepted plan can run to the end."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TASKS = 12
MAX_DEPTH = 6
"""Tasks on the longest dependency chain: a plan is at most this many rounds of work deep."""
MAX_FAN_IN = 8
"""Tasks one task may depend on: what it is handed stays within what one model call can read."""
MAX_FAN_OUT = 8
"""Tasks that may depend on one task: no single result fans out into a swarm of work."""


class PlannedTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    kind: str = Field(min_length=1, max_length=64)
    instruction: str = Field(min_length=1, max_length=4_000)
    depends_on: list[str] = Field(default_factory=list, max_length=MAX_FAN_IN)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[PlannedTask] = Field(min_length=1, max_length=MAX_TASKS)

    @model_validator(mode="after")
    def _dependencies_form_a_dag(self) -> Plan:
        ids = [t.id for t in self.tasks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task ids must be unique, got {ids}")
        known = set(ids)
        for task in self.tasks:
            missing = [d for d in task.depends_on if d not in known]
            if missing:
                raise ValueError(f"task {task.id!r} depends on unknown tasks {missing}")
            if task.id in task.depends_on:
                raise ValueError(f"task {task.id!r} depends on itself")
        for tid in ids:
            dependents = [t.id for t in self.tasks if tid in t.depends_on]
            if len(dependents) > MAX_FAN_OUT:
                raise ValueError(
                    f"{len(dependents)} tasks depend on task {tid!r}; at most {MAX_FAN_OUT} may: make the plan narrower"
                )
        # Kahn's algorithm: a plan with a cycle would never finish. Each round is one level of
        # depth, so the rounds count the longest chain.
        remaining = {t.id: set(t.depends_on) for t in self.tasks}
        depth = 0
        while remaining:
            ready = [tid for tid, deps in remaining.items() if not deps]
            if not ready:
                raise ValueError(f"tasks {sorted(remaining)} form a dependency cycle")
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(
                    f"the dependency chain is deeper than {MAX_DEPTH} tasks (tasks {sorted(remaining)} are past it); "
                    "make the plan flatter"
                )
            for tid in ready:
                del remaining[tid]
            for deps in remaining.values():
                deps.difference_update(ready)
        return self

    def check_kinds(self, kinds: set[str]) -> None:
        """Raise ValueError when a task names an agent kind that does not exist."""
        unknown = sorted({t.kind for t in self.tasks} - kinds)
        if unknown:
            raise ValueError(f"unknown agent kinds {unknown}; known kinds are {sorted(kinds)}")
