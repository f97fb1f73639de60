"""A goal's timeline, built from its event record and its dead letters: the plan, each task's steps
(recalls, model calls, tool calls, its result), the goal's end and its totals; as a rich tree or JSON.
Both show the same content: the tree is drawn from what the JSON holds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from rich.markup import escape
from rich.tree import Tree

from memory.timeline import GoalTimeline
from schemas.budget import LIMIT_NAMES
from schemas.envelope import Envelope
from schemas.events import (
    ApprovalDecided,
    ApprovalRequested,
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalFallbackStarted,
    GoalStateChanged,
    GoalPlanned,
    GoalReopened,
    GoalSubmitted,
    LLMCallRecorded,
    MemoryRecallCompleted,
    MemoryRecallRequested,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    ToolCallCompleted,
    ToolCallRequested,
    WorkDeadLettered,
    decode_event,
    goal_end,
)
from services.ops.dlq import DeadLetter
from services.ops.terminal import short

Step = dict[str, Any]
"""One line of the timeline, as JSON: `type`, `at` (ISO time), `t_s` (seconds since the goal
started) and the fields of its type."""


@dataclass
class TaskTrace:
    id: str
    """The planned id (`r1`); the task's own id is `<goal>.<id>`."""
    task_id: str
    kind: str
    instruction: str = ""
    depends_on: list[str] = field(default_factory=list)
    status: str = "pending"
    """pending, assigned, completed or failed."""
    steps: list[Step] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "task_id": self.task_id, "kind": self.kind, "instruction": self.instruction,
            "depends_on": self.depends_on, "status": self.status, "steps": self.steps,
        }


@dataclass
class GoalTrace:
    goal_id: str
    tenant: str
    text: str | None = None
    started: datetime | None = None
    ended: datetime | None = None
    plan: dict[str, Any] | None = None
    steps: list[Step] = field(default_factory=list)
    """The goal's own steps, outside any task: planning and answering calls, reopenings, its end."""
    tasks: dict[str, TaskTrace] = field(default_factory=dict)
    """By task id, in the plan's order (then in order of appearance)."""
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] | None = None

    def all_steps(self) -> list[Step]:
        return self.steps + [s for t in self.tasks.values() for s in t.steps]

    def totals(self) -> dict[str, Any]:
        steps = self.all_steps()
        calls = [s for s in steps if s["type"] == "llm_call"]
        tools = [s for s in steps if s["type"] == "tool_call"]
        input_tokens = sum(int(c["input_tokens"]) for c in calls)
        output_tokens = sum(int(c["output_tokens"]) for c in calls)
        wall = (self.ended - self.started).total_seconds() if self.started and self.ended else None
        return {
            "llm_calls": len(calls),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "tokens": input_tokens + output_tokens,
            "cost_usd": round(sum(float(c["cost_usd"]) for c in calls), 6),
            "llm_latency_ms": round(sum(float(c["latency_ms"]) for c in calls), 3),
            "tool_calls": len(tools),
            "tool_errors": sum(1 for t in tools if t["ok"] is False),
            "recalls": sum(1 for s in steps if s["type"] == "recall"),
            "dead_letters": len(self.dead_letters),
            "wall_time_s": wall,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "goal_id": self.goal_id,
            "tenant": self.tenant,
            "text": self.text,
            "started_at": self.started.isoformat() if self.started else None,
            "plan": self.plan,
            "steps": self.steps,
            "tasks": [t.summary() for t in self.tasks.values()],
            "dead_letters": self.dead_letters,
            "outcome": self.outcome or {"status": "running"},
            "totals": self.totals(),
        }


async def recorded_events(timeline: GoalTimeline, tenant: str, goal_id: str) -> list[Envelope] | None:
    """The goal's recorded events, or None when it has no record (for this tenant) at all."""
    entries = await timeline.read(tenant, goal_id)
    if not entries:
        return None
    events: list[Envelope] = []
    for entry in entries:
        try:
            events.append(decode_event(entry.payload))
        except (ValidationError, ValueError):
            continue  # the recorder writes events only; an entry that is not one has nothing to show
    return events


def build_trace(goal_id: str, tenant: str, events: Iterable[Envelope], dead_letters: Iterable[DeadLetter]) -> GoalTrace:
    """The goal's trace from its events (any order: they are put in time order) and dead letters."""
    return _Builder(GoalTrace(goal_id, tenant)).build(events, dead_letters)


class _Builder:
    def __init__(self, trace: GoalTrace) -> None:
        self.trace = trace
        self.pending: dict[str, Step] = {}
        """Requests waiting for their reply, by call or request id."""

    def build(self, events: Iterable[Envelope], dead_letters: Iterable[DeadLetter]) -> GoalTrace:
        # The recorder reads each topic on its own, so the stream's order is not the order of events.
        ordered = sorted((e for e in events if e.goal_id == self.trace.goal_id), key=lambda e: e.ts)
        if ordered:
            submitted = next((e for e in ordered if isinstance(e, GoalSubmitted)), None)
            self.trace.started = submitted.ts if submitted else ordered[0].ts
            self.trace.ended = ordered[-1].ts
        for event in ordered:
            self._add(event)
        self.trace.dead_letters = [d.summary() for d in dead_letters]
        return self.trace

    def _step(self, event: Envelope, type_: str, **fields: Any) -> Step:
        start = self.trace.started or event.ts
        step: Step = {"type": type_, "at": event.ts.isoformat(), "t_s": round((event.ts - start).total_seconds(), 3)}
        step.update(fields)
        task = self._task(event)
        (task.steps if task else self.trace.steps).append(step)
        return step

    def _task(self, event: Envelope) -> TaskTrace | None:
        if not event.task_id:
            return None
        task = self.trace.tasks.get(event.task_id)
        if task is None:  # a task the recorded plan does not name (or the plan is not in the record)
            kind = getattr(event, "kind", None) or getattr(event, "agent_kind", None) or getattr(event, "agent", None) or "?"
            task = TaskTrace(event.task_id.removeprefix(f"{event.goal_id}."), event.task_id, str(kind))
            self.trace.tasks[event.task_id] = task
        return task

    def _add(self, event: Envelope) -> None:
        trace = self.trace
        match event:
            case GoalSubmitted():
                trace.text = event.text
                self._step(event, "submitted", text=event.text, submitted_by=event.submitted_by,
                           budget=event.budget.model_dump(exclude_none=True))
            case GoalPlanned():
                trace.plan = {
                    "model": event.model, "prompt_version": event.prompt_version,
                    "budget": event.budget.model_dump(exclude_none=True),
                    "tasks": [t.model_dump() for t in event.plan.tasks],
                }
                for t in event.plan.tasks:
                    task_id = f"{event.goal_id}.{t.id}"
                    known = trace.tasks.get(task_id)
                    steps = known.steps if known else []
                    trace.tasks[task_id] = TaskTrace(t.id, task_id, t.kind, t.instruction, list(t.depends_on), steps=steps)
            case TaskAssigned():
                self._step(event, "assigned", kind=event.kind, resume=event.resume, inputs=sorted(event.inputs))
                self._status(event, "assigned")
            case MemoryRecallRequested():
                self.pending[event.request_id] = self._step(
                    event, "recall", request_id=event.request_id, query=event.query, k=event.k, hits=None,
                )
            case MemoryRecallCompleted():
                hits = [
                    {"kind": h.kind, "label": h.label, "score": round(h.score, 4), "text": h.text,
                     "memory_id": h.memory_id, "source_goal": h.source_goal}
                    for h in event.hits
                ]
                step = self._take(event.request_id) or self._step(
                    event, "recall", request_id=event.request_id, query=None, k=None,
                )
                step["hits"] = hits
            case LLMCallRecorded():
                self._step(
                    event, "llm_call", purpose=event.purpose, agent=event.agent, model=event.model,
                    prompt_version=event.prompt_version, input_tokens=event.input_tokens,
                    output_tokens=event.output_tokens, context_tokens=event.context_tokens,
                    full_history_tokens=event.full_history_tokens, cost_usd=event.cost_usd,
                    latency_ms=event.latency_ms, step_id=event.step_id, instance=event.instance,
                    findings=event.findings,
                )
            case ToolCallRequested():
                self.pending[event.call_id] = self._step(
                    event, "tool_call", call_id=event.call_id, step_id=event.step_id, tool=event.tool,
                    arguments=event.arguments, agent_kind=event.agent_kind,
                    ok=None, output=None, error=None, replayed=False, latency_ms=None,
                )
            case ToolCallCompleted():
                step = self._take(event.call_id) or self._step(
                    event, "tool_call", call_id=event.call_id, step_id=event.step_id, tool=event.tool,
                    arguments=None, agent_kind=None, latency_ms=None,
                )
                requested = datetime.fromisoformat(step["at"])
                step.update(ok=event.ok, output=event.output, error=event.error, replayed=event.replayed,
                            latency_ms=round((event.ts - requested).total_seconds() * 1000, 3))
            case ApprovalRequested():
                self._step(event, "approval_requested", approval_id=event.approval_id, call_id=event.call_id,
                           tool=event.tool, expires_at=event.expires_at.isoformat())
            case ApprovalDecided():
                self._step(event, "approval_decided", approval_id=event.approval_id, approved=event.approved,
                           decided_by=event.decided_by, reason=event.reason)
            case TaskCompleted():
                self._step(event, "task_completed", result=event.result, steps=event.steps)
                self._status(event, "completed")
            case TaskFailed():
                self._step(event, "task_failed", reason=event.reason, detail=event.detail)
                self._status(event, "failed")
            case WorkDeadLettered():
                self._step(event, "dead_lettered", reason=event.reason, detail=event.detail,
                           dead_event_type=event.dead_event_type, dlq_topic=event.dlq_topic,
                           original_topic=event.original_topic, figures=event.figures)
            case GoalReopened():
                self._step(event, "goal_reopened", reason=event.reason, requested_by=event.requested_by)
            case GoalStateChanged():
                self._step(event, "state_changed", from_state=event.from_state, to_state=event.to_state,
                           action=event.action, requested_by=event.requested_by, reason=event.reason)
                if goal_end(event) == "cancelled":
                    trace.outcome = {"status": "cancelled", "at": event.ts.isoformat(),
                                     "requested_by": event.requested_by, "reason": event.reason}
            case GoalFallbackStarted():
                self._step(event, "fallback_started", fallback=event.fallback, reason=event.reason, detail=event.detail)
            case GoalEscalated():
                self._step(event, "escalated", reason=event.reason, detail=event.detail)
            case GoalCompleted():
                self._step(event, "goal_completed", answer=event.answer, path=event.path)
                trace.outcome = {"status": "completed", "at": event.ts.isoformat(), "answer": event.answer,
                                 "task_results": event.task_results, "path": event.path,
                                 "fallback": event.fallback, "answered_by": event.answered_by}
            case GoalFailed():
                self._step(event, "goal_failed", reason=event.reason, detail=event.detail, figures=event.figures)
                trace.outcome = {"status": "failed", "at": event.ts.isoformat(), "reason": event.reason,
                                 "detail": event.detail, "figures": event.figures}

    def _take(self, key: str) -> Step | None:
        return self.pending.pop(key) if key in self.pending else None

    def _status(self, event: Envelope, status: str) -> None:
        task = self._task(event)
        if task is not None:
            task.status = status


# ---- the tree -------------------------------------------------------------------------------------

_STATUS = {
    "pending": "[dim]not started[/]", "assigned": "[yellow]unfinished[/]",
    "completed": "[green]✓ completed[/]", "failed": "[red]✗ failed[/]",
}


def trace_tree(data: dict[str, Any]) -> Tree:
    """The tree of a trace's JSON (GoalTrace.to_json), in time order within each branch."""
    root = Tree(f"[bold]goal {escape(data['goal_id'])}[/] (tenant {escape(data['tenant'])}): {short(data['text'] or '?')}")
    tasks = data["tasks"]
    # The goal's own steps go before the tasks when they came before the tasks' first step (the
    # submission, the planning calls), after them otherwise (the answering call, a reopening).
    first = min((s["t_s"] for task in tasks for s in task["steps"]), default=float("inf"))
    own = [s for s in data["steps"] if s["type"] not in ("goal_completed", "goal_failed")]  # the end is shown below
    for step in (s for s in own if s["t_s"] <= first):
        root.add(_line(step))
    plan = data["plan"]
    if plan is not None:
        budget = ", ".join(f"{n}={plan['budget'][n]:g}" for n in LIMIT_NAMES if n in plan["budget"]) or "unlimited"
        node = root.add(
            f"[bold]plan[/] ({escape(plan['prompt_version'])}, {escape(plan['model'])}): "
            f"{len(plan['tasks'])} task(s); budget {budget}"
        )
        for t in plan["tasks"]:
            after = f" after {escape(', '.join(t['depends_on']))}" if t["depends_on"] else ""
            node.add(f"{escape(t['id'])} [bold]{escape(t['kind'])}[/]{after}: {short(t['instruction'], 80)}")
    else:
        root.add("[yellow]no plan in the record[/]")
    for task in tasks:
        node = root.add(
            f"[cyan]task {escape(task['id'])}[/] [bold]{escape(task['kind'])}[/] {_STATUS.get(task['status'], task['status'])}"
        )
        for step in task["steps"]:
            _add_step(node, step)
    for step in (s for s in own if s["t_s"] > first):
        root.add(_line(step))
    if data["dead_letters"]:
        node = root.add(f"[red]dead letters ({len(data['dead_letters'])})[/]")
        for d in data["dead_letters"]:
            node.add(
                f"[red]{escape(d['reason'])}[/] {escape(d['id'])} from {escape(d['original_topic'])}: "
                f"{escape(d['event_type'] or 'not an event')}, {short(d['exception_class'] + ': ' + d['exception_message'], 90)} "
                f"(attempts {d['attempts']})"
            )
    root.add(_end(data["outcome"]))
    root.add(_totals(data["totals"]))
    return root


def _add_step(node: Tree, step: Step) -> None:
    branch = node.add(_line(step))
    if step["type"] == "recall":
        for hit in step["hits"] or []:
            label = f" [red]{escape(hit['label'])}[/]" if hit["label"] else ""
            branch.add(f"[magenta]{escape(hit['kind'])}[/]{label} {hit['score']:.2f}: {short(hit['text'], 80)}")


def _at(step: Step) -> str:
    return f"[dim]+{step['t_s']:.3f}s[/] "


def _line(step: Step) -> str:
    at, kind = _at(step), step["type"]
    if kind == "submitted":
        return at + f"submitted by {escape(step['submitted_by'])}"
    if kind == "assigned":
        again = " (resumed)" if step["resume"] else ""
        inputs = f" with the results of {escape(', '.join(step['inputs']))}" if step["inputs"] else ""
        return at + f"assigned to [bold]{escape(step['kind'])}[/]{again}{inputs}"
    if kind == "recall":
        hits = "[yellow]no reply[/]" if step["hits"] is None else f"{len(step['hits'])} hit(s)"
        return at + f"[magenta]recall[/] {short(step['query'] or '?', 60)} → {hits}"
    if kind == "llm_call":
        context = ""
        if step["context_tokens"] is not None:
            context = f", context {step['context_tokens']}"
            if step["full_history_tokens"] is not None:
                context += f" of {step['full_history_tokens']}"
        findings = f" [red]{len(step['findings'])} finding(s)[/]" if step["findings"] else ""
        return at + (
            f"[blue]llm[/] {escape(step['purpose'])} {escape(step['agent'])} {escape(step['model'])} "
            f"{escape(step['prompt_version'])}: {step['input_tokens']} in, {step['output_tokens']} out{context}; "
            f"${step['cost_usd']:.4f}, {step['latency_ms']:.0f} ms{findings}"
        )
    if kind == "tool_call":
        args = ", ".join(f"{k}={short(str(v), 40)}" for k, v in (step["arguments"] or {}).items())
        if step["ok"] is None:
            result = "[yellow]no reply[/]"
        elif step["ok"]:
            result = f"[green]ok[/] {short(step['output'] or '', 60)}"
        else:
            result = f"[red]error[/] {short(step['error'] or '', 60)}"
        replayed = " (stored result, not run again)" if step.get("replayed") else ""
        return at + f"[yellow]tool[/] {escape(step['tool'])}({args}) → {result}{replayed}"
    if kind == "approval_requested":
        return at + f"[yellow]approval requested[/] for {escape(step['tool'])} ({escape(step['approval_id'])})"
    if kind == "approval_decided":
        verdict = "[green]approved[/]" if step["approved"] else f"[red]denied[/] {short(step['reason'], 60)}"
        return at + f"{verdict} by {escape(step['decided_by'])}"
    if kind == "task_completed":
        return at + f"[green]✓ result[/] after {step['steps']} step(s): {short(step['result'], 80)}"
    if kind == "task_failed":
        return at + f"[red]✗ failed[/] ({escape(step['reason'])}): {short(step['detail'], 80)}"
    if kind == "dead_lettered":
        return at + (
            f"[red]✗ dead-lettered[/] {escape(step['dead_event_type'])} ({escape(step['reason'])}{_figures(step['figures'])}) "
            f"→ {escape(step['dlq_topic'])}: {short(step['detail'], 80)}"
        )
    if kind == "state_changed":
        why = f": {escape(step['reason'])}" if step["reason"] else ""
        return at + f"[cyan]■ goal {step['to_state']}[/] (was {step['from_state']}, by {escape(step['requested_by'])}){why}"
    if kind == "fallback_started":
        return at + f"[yellow]↯ agents failed[/] ({escape(step['reason'])}) → [cyan]fallback {escape(step['fallback'])}[/]"
    if kind == "escalated":
        return at + f"[yellow]↯ agents failed[/] ({escape(step['reason'])}) → [magenta]waiting for a person[/]"
    if kind == "goal_reopened":
        return at + f"[cyan]↻ goal reopened[/] ({escape(step['reason'])}, by {escape(step['requested_by'])})"
    return at + escape(kind)


def _figures(figures: dict[str, float]) -> str:
    return "".join(f", {escape(k)} {v:g}" for k, v in figures.items())


def _end(outcome: dict[str, Any]) -> str:
    if outcome["status"] == "completed":
        by = {"fallback": f" (by fallback {outcome.get('fallback')})", "human": f" (by {outcome.get('answered_by')})"}
        return f"[green bold]✓ answer{escape(by.get(outcome.get('path', 'agent'), ''))}[/]: {short(outcome['answer'], 200)}"
    if outcome["status"] == "cancelled":
        return f"[yellow bold]■ goal cancelled[/] by {escape(outcome['requested_by'])}"
    if outcome["status"] == "failed":
        return f"[red bold]✗ goal failed[/] ({escape(outcome['reason'])}{_figures(outcome['figures'])}): {short(outcome['detail'], 160)}"
    return "[yellow]not finished: nothing in the record (yet) completes, fails or cancels it[/]"


def _totals(totals: dict[str, Any]) -> str:
    wall = f"{totals['wall_time_s']:.2f}s" if totals["wall_time_s"] is not None else "?"
    return (
        f"[bold]totals[/]: {totals['llm_calls']} model call(s), {totals['input_tokens']} in + "
        f"{totals['output_tokens']} out = {totals['tokens']} tokens, ${totals['cost_usd']:.4f}; "
        f"{totals['tool_calls']} tool call(s) ({totals['tool_errors']} failed), {totals['recalls']} recall(s), "
        f"{totals['dead_letters']} dead letter(s); wall time {wall}"
    )
