"""Shows a goal's events as they happen: the plan, tasks, memory recalls, tool calls and the answer."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from schemas.budget import LIMIT_NAMES
from schemas.envelope import Envelope
from schemas.events import (
    GoalCompleted,
    GoalEscalated,
    GoalFailed,
    GoalFallbackStarted,
    GoalLifecycleRejected,
    GoalPlanned,
    GoalReopened,
    GoalStateChanged,
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
)
from services.ops.terminal import short


def _task(event: Envelope) -> str:
    return escape((event.task_id or "").rsplit(".", 1)[-1])


class ProgressView:
    def __init__(self, console: Console, goal_id: str) -> None:
        self.console = console
        self.goal_id = goal_id
        self.seen: set[str] = set()
        self.outcome: GoalCompleted | GoalFailed | None = None
        self.cancelled = False
        self.escalated: GoalEscalated | None = None
        """Set while the goal waits for a person (its agents failed and its type escalates)."""
        self.llm_calls = 0
        self.tokens = 0

    def show(self, event: Envelope) -> None:
        if event.goal_id != self.goal_id or event.event_id in self.seen:
            return
        self.seen.add(event.event_id)
        line = self._line(event)
        if line:
            self.console.print(line)
        if isinstance(event, GoalCompleted | GoalFailed):
            self.outcome = event
            self._finish(event)
        if isinstance(event, GoalStateChanged) and event.to_state == "cancelled":
            self.cancelled = True
        if isinstance(event, GoalEscalated):
            self.escalated = event

    def _line(self, event: Envelope) -> str | Table | None:
        match event:
            case GoalSubmitted():
                return f"[bold]goal[/] {escape(event.goal_id)} submitted: {short(event.text)}"
            case GoalPlanned():
                table = Table(title=f"plan ({escape(event.prompt_version)}, {escape(event.model)})", title_justify="left")
                for column in ("task", "agent", "instruction", "after"):
                    table.add_column(column)
                for t in event.plan.tasks:
                    table.add_row(t.id, t.kind, short(t.instruction, 70), ", ".join(t.depends_on) or "-")
                limits = [f"{n}={getattr(event.budget, n):g}" for n in LIMIT_NAMES if getattr(event.budget, n) is not None]
                table.caption = f"budget: {', '.join(limits) or 'unlimited'}"
                table.caption_justify = "left"
                return table
            case WorkDeadLettered():
                return (
                    f"[red]✗ dead-lettered[/] {escape(event.dead_event_type)} ({escape(event.reason)}) "
                    f"→ {escape(event.dlq_topic)}: {short(event.detail)}"
                )
            case GoalReopened():
                return f"[cyan]↻ goal reopened[/] ({escape(event.reason)}, by {escape(event.requested_by)})"
            case GoalStateChanged():
                why = f": {escape(event.reason)}" if event.reason else ""
                return (
                    f"[cyan]■ goal {event.to_state}[/] (was {event.from_state}, by {escape(event.requested_by)}){why}"
                )
            case GoalFallbackStarted():
                return (
                    f"[yellow]↯ agents failed[/] ({escape(event.reason)}): {short(event.detail)}\n"
                    f"[cyan]→ fallback {escape(event.fallback)}[/] runs instead"
                )
            case GoalEscalated():
                found = f"; {len(event.task_results)} task results kept" if event.task_results else ""
                return (
                    f"[yellow]↯ agents failed[/] ({escape(event.reason)}): {short(event.detail)}\n"
                    f"[magenta]? waiting for a person[/]{found}: "
                    f"switchboard goal answer {escape(event.goal_id)} \"...\" (or goal cancel)"
                )
            case GoalLifecycleRejected():
                return f"[yellow]! {event.action} rejected[/]: {escape(event.detail)}"
            case TaskAssigned():
                # A delegated subtask's id is its parent's plus `/<kind>-<n>`: `w1/researcher-1`.
                by = f" (delegated, depth {event.depth})" if event.delegated_by else ""
                return f"[cyan]→ task {_task(event)}[/] assigned to [bold]{escape(event.kind)}[/]{by}"
            case MemoryRecallRequested():
                return f"  [magenta]memory[/] {_task(event)} recalls: {short(event.query, 60)}"
            case MemoryRecallCompleted():
                found = "; ".join(short(h.text, 50) for h in event.hits[:2]) or "nothing relevant"
                return f"  [magenta]memory[/] {_task(event)} ← {len(event.hits)} memories: {found}"
            case LLMCallRecorded():
                self.llm_calls += 1
                self.tokens += event.input_tokens + event.output_tokens
                context = (
                    f" (context {event.context_tokens} of a full history of {event.full_history_tokens})"
                    if event.context_tokens is not None and event.full_history_tokens is not None
                    else ""
                )
                return (
                    f"  [dim]llm {escape(event.agent)} {event.purpose} {escape(event.model)}: "
                    f"{event.input_tokens}+{event.output_tokens} tokens{context}, ${event.cost_usd:.4f}, "
                    f"{event.latency_ms:.0f} ms[/]"
                )
            case ToolCallRequested():
                args = ", ".join(f"{k}={short(str(v), 40)}" for k, v in event.arguments.items())
                return f"  [yellow]tool[/] {_task(event)} calls {escape(event.tool)}({args})"
            case ToolCallCompleted():
                result = short(event.output, 80) if event.ok else f"[red]error: {short(event.error or '', 80)}[/]"
                again = " (stored result)" if event.replayed else ""
                return f"  [yellow]tool[/] {_task(event)} ← {escape(event.tool)}: {result}{again}"
            case TaskCompleted():
                return f"[green]✓ task {_task(event)}[/] done in {event.steps} steps: {short(event.result, 80)}"
            case TaskFailed():
                return f"[red]✗ task {_task(event)} failed[/] ({escape(event.reason)}): {short(event.detail)}"
        return None

    def _finish(self, event: GoalCompleted | GoalFailed) -> None:
        if isinstance(event, GoalCompleted):
            by = {"agent": "", "fallback": f" (by fallback {event.fallback})", "human": f" (by {event.answered_by})"}
            title = f"final answer{escape(by[event.path])}"
            self.console.print(Panel(escape(event.answer), title=title, border_style="green"))
        else:
            figures = ", ".join(f"{k} {v:g}" for k, v in event.figures.items())
            body = f"{escape(event.reason)}" + (f" ({figures})" if figures else "") + f"\n{escape(event.detail)}"
            self.console.print(Panel(body, title="goal failed", border_style="red"))
        self.console.print(f"[dim]{self.llm_calls} model calls, {self.tokens} tokens[/]")
