"""`switchboard replay GOAL`: run a recorded goal again from its record, or as a what-if run with
another model or prompt version, and compare (services/ops/replay.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from services.ops.replay import GoalRecord, causal_order, compare, diff, outcome, run_again, run_summary
from services.ops.terminal import TenantOption, console, echo_json, err, run_async, setup_logging
from services.ops.trace_cli import load_record
from services.runtime.host import Settings


def replay(
    goal_id: Annotated[str, typer.Argument(metavar="GOAL", help="The goal's id, as `goal submit` printed it (g-...).")],
    tenant: TenantOption = None,
    model: Annotated[str | None, typer.Option(
        help="What-if: run the goal again with this LiteLLM model, for every agent and the orchestrator.",
    )] = None,
    prompt_version: Annotated[str | None, typer.Option(
        help="What-if: run the goal again with this version (v2) of every prompt that has one.",
    )] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to end.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts).")] = False,
) -> None:
    """Run a recorded goal again: from its recorded model responses, or as a what-if run.

    The goal's record is the memory service's event stream in Redis (what `switchboard trace`
    shows). The goal runs again with the same tenant, goal id, text and budget, through every
    service, in this process and in a namespace of its own with in-process stores: nothing of the
    recorded run, or of any deployment, is touched.

    Without --model and --prompt-version it is a deterministic replay: every model call is answered
    with the recorded response, every tool call and memory recall with its recorded result, and no
    model is called. It prints whether the replay produced the same events, in the same causal order
    (the goal's and each task's), and the same answer, or the first difference.

    With --model or --prompt-version it is a what-if run: the model is called; tool calls the record
    holds (the same tool with the same arguments) get the recorded result, other calls run, except
    those with a side effect, which are not run (the model is told so). It prints both runs side by
    side: plan, models and prompt versions, tool calls, tokens, cost and answer, differences marked.

    Needs REDIS_URL (not Kafka). Exits 0 when the replay is identical (a what-if run: when it ran),
    1 when it differs, 2 when the goal has no record for the tenant, on a missing setting, an unknown
    prompt version, or when the run does not end within --timeout.
    """
    settings = Settings()
    setup_logging(settings, quiet=True)
    who = tenant or settings.platform.tenant
    if not settings.redis.url:
        err.print("[red]REDIS_URL is not set: the goal's record is in Redis (the memory service's record)[/]")
        raise typer.Exit(2)
    what_if = model is not None or prompt_version is not None

    async def main() -> int:
        events = await load_record(settings.redis.url or "", settings.platform.namespace, who, goal_id)
        if events is None:
            return 2
        try:
            record = GoalRecord(events, what_if=what_if)
        except ValueError as exc:
            err.print(f"[red]goal {escape(goal_id)}: {escape(str(exc))}[/]")
            return 2
        try:
            rerun = await run_again(record, settings, model=model, prompt_version=prompt_version, timeout=timeout)
        except TimeoutError:
            err.print(f"[red]the {'what-if run' if what_if else 'replay'} of {escape(goal_id)} did not end within {timeout:.0f}s[/]")
            return 2
        if what_if:
            before = run_summary(events, goal_id, who)
            after = run_summary(rerun.events, goal_id, who)
            changes = diff(before, after)
            data: dict[str, Any] = {
                "goal_id": goal_id, "tenant": who, "mode": "what-if", "recorded": before, "what_if": after,
                "diff": changes, "run": rerun.to_json(),
            }
            if as_json:
                echo_json(data)
            else:
                console.print(_side_by_side(goal_id, changes, model, prompt_version))
                _notes(rerun.to_json())
            return 0
        comparison = compare(events, rerun.events, goal_id)
        data = {
            "goal_id": goal_id, "tenant": who, "mode": "replay", "identical": comparison.identical,
            "comparison": comparison.to_json(), "recorded": outcome(events), "replayed": outcome(rerun.events),
            "recorded_order": causal_order(events, goal_id), "replayed_order": causal_order(rerun.events, goal_id),
            "run": rerun.to_json(),
        }
        if as_json:
            echo_json(data)
        else:
            _replay_report(data)
        return 0 if comparison.identical and rerun.model_calls == 0 else 1

    raise typer.Exit(run_async(main()))


def _replay_report(data: dict[str, Any]) -> None:
    comparison, run = data["comparison"], data["run"]
    answered = run["answered"]
    served = (
        f"{run['model_calls']} model call(s) made; the record answered {answered.get('model', 0)} model call(s), "
        f"{answered.get('tool', 0)} tool call(s) and {answered.get('recall', 0)} recall(s)"
    )
    if comparison["identical"]:
        console.print(
            f"[green]identical[/]: {comparison['events']} events of the goal and its {comparison['tasks']} task(s), "
            f"in the same causal order, and the same end. {served}."
        )
    else:
        console.print(f"[red]differs[/]: {escape(comparison['difference'] or '')}. {served}.")
    for what in run["diverged"]:
        console.print(f"[red]diverged at {escape(what)}[/]")
    if run["changed_inputs"]:
        console.print(
            f"[yellow]{len(run['changed_inputs'])} model call(s) were sent other messages than recorded "
            "(prompt files or context assembly changed since)[/]"
        )
    replayed = data["replayed"]
    if replayed["status"] == "completed":
        console.print(f"answer: {escape(replayed['answer'])}")
    else:
        console.print(f"goal {replayed['status']}: {escape(replayed.get('reason') or '')}")


_ROWS = {
    "plan": "plan", "models": "models", "prompt_versions": "prompt versions", "tool_calls": "tool calls",
    "llm_calls": "model calls", "input_tokens": "tokens in", "output_tokens": "tokens out", "cost_usd": "cost (USD)",
    "status": "status", "answer": "answer",
}


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return escape("\n".join(str(v) for v in value)) or "[dim]none[/]"
    if isinstance(value, float):
        return f"{value:.6f}"
    return escape(str(value))


def _side_by_side(goal_id: str, changes: dict[str, dict[str, Any]], model: str | None, version: str | None) -> Table:
    what = ", ".join(x for x in (f"model {model}" if model else "", f"prompt {version}" if version else "") if x)
    table = Table(title=f"goal {escape(goal_id)}: recorded vs what-if ({escape(what)})", show_lines=True)
    table.add_column("")
    table.add_column("recorded")
    table.add_column(f"what-if ({escape(what)})")
    for key, name in _ROWS.items():
        row = changes[key]
        mark = "[yellow]≠ " if row["changed"] else "[dim]= "
        table.add_row(f"{mark}{name}[/]", _cell(row["recorded"]), _cell(row["what_if"]))
    return table


def _notes(run: dict[str, Any]) -> None:
    answered, live = run["answered"], run["live"]
    console.print(
        f"what-if run: {run['model_calls']} model call(s); tool calls answered from the record: "
        f"{answered.get('tool', 0)}, run: {live.get('tool', 0)}, not run (side effect): {len(run['withheld'])}; "
        f"recalls from the record: {answered.get('recall', 0)}, run: {live.get('recall', 0)}"
    )
    for call in run["withheld"]:
        console.print(f"[yellow]not run (side effect): {escape(call)}[/]")
