"""Context assembly: what the model is shown on one agent step, fitted to a token budget.

A step's context is built afresh from the task, its recalled memories and its scratchpad (the
model's turns and the tool replies), so a call of a long task costs no more than the budget.

How `budget_tokens` is shared, in this order:

1. Always sent, whatever the budget: the system prompt, the task (instruction and goal) and the
   latest step verbatim (the model's last turn and the reply to each of its tool calls, already
   cut to AGENT_TOOL_OUTPUT_CHARS). Without them the model cannot act, so when they alone exceed
   the budget they are sent anyway, nothing else is, and `tokens` comes out above the budget.
2. The results of the tasks this one depends on (`<inputs>`): what is left, up to half the
   budget; when they do not fit, each is cut to the same length (short ones stay whole).
3. Recalled memories, in their ranked order, up to a quarter of the budget; the first that does
   not fit ends the packing, so a memory never displaces a better-ranked one. Failure lessons
   (memories with a `label`) go in a block of their own, headed as mistakes not to repeat.
4. The steps before the latest one: all that is left. If they all fit verbatim they go as they
   are (nothing is lost while a task is short); else they are compressed into one summary
   message after the task: one line per step (the tools, their arguments cut short, the first
   100 characters of each reply; or what the model said). When even the lines do not all fit,
   the oldest go first and the summary says how many were left out.

Tokens are counted with `estimate_tokens`: per message, its content, plus the JSON of its tool
calls for an assistant message. `full_history_tokens` counts the same way what the naive context
would be: every input and memory uncut by the budget, and the whole scratchpad verbatim. It is
never below `tokens`: the summary is used only when the verbatim steps do not fit.

Inputs, memories and tool replies are untrusted data: scanned in full, neutralized, and shown
inside `<untrusted ...>` blocks (services/runtime/injection.py). The summary, which quotes tool
replies and the model's own arguments, is one such block too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.events import MemoryHit, TaskAssigned
from services.runtime.injection import neutralize, scan
from services.runtime.offline_model import estimate_tokens

INPUTS_SHARE = 1 / 2
"""At most this share of the budget goes to the results of the tasks this one depends on."""
MEMORY_SHARE = 1 / 4
"""At most this share of the budget goes to recalled memories."""
SUMMARY_REPLY_CHARS = 100
"""Characters of each tool reply (or of what the model said) in a summary line."""
SUMMARY_ARGUMENT_CHARS = 40
"""Characters of each argument value in a summary line."""
FAILURES_HEADING = "Past failures in tasks like this one: do NOT repeat them."

_TOOL_OUTPUT = re.compile(r"<tool_output>\n?(.*?)\n?</tool_output>", re.DOTALL)


@dataclass(frozen=True)
class Shown:
    """Untrusted data as the model is shown it, and the injection markers found in it."""

    text: str
    findings: list[str]


@dataclass(frozen=True)
class Assembled:
    messages: list[dict[str, Any]]
    """The full list sent to the model, system prompt first."""
    tokens: int
    """Estimated tokens of `messages`."""
    full_history_tokens: int
    """The naive context: system, task, inputs, every memory and the whole uncompressed scratchpad."""
    findings: list[str]
    """Injection markers found in the inputs and memories shown (tool replies are scanned when they
    arrive)."""
    memories_used: int
    """How many of the recalled memories fit."""


def clip(text: str, limit: int) -> str:
    """Neutralized and cut to `limit` characters (neutralized again: a cut can end in a tag)."""
    clean = neutralize(text)
    return clean if len(clean) <= limit else neutralize(clean[:limit]) + "\n[truncated]"


def untrusted(source: str, body: str, limit: int) -> Shown:
    """Data from tools reaches the model delimited, size-limited, marked untrusted and unable to
    close its block; it is scanned in full, before it is cut."""
    findings = [f.describe(source) for f in scan(body)]
    text = f'<untrusted source="{source}">\n<tool_output>\n{clip(body, limit)}\n</tool_output>\n</untrusted>'
    return Shown(text, findings)


def message_tokens(message: dict[str, Any]) -> int:
    tokens = estimate_tokens(str(message.get("content") or ""))
    if message.get("tool_calls"):
        tokens += estimate_tokens(json.dumps(message["tool_calls"]))
    return tokens


def context_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(message_tokens(m) for m in messages)


def assemble(
    *,
    system: str,
    task: TaskAssigned,
    memories: list[MemoryHit],
    scratchpad: list[dict[str, Any]],
    budget_tokens: int,
    tool_output_chars: int,
) -> Assembled:
    """The messages for one model call of `task`, within `budget_tokens` unless the system prompt,
    the task and the latest step alone exceed it (see the module docstring for the split)."""
    steps = split_steps(scratchpad)
    latest = steps[-1] if steps else []
    older = steps[:-1]
    head = f"Task: {task.instruction}\nGoal: {task.goal_text}"

    def total(task_text: str, earlier: list[dict[str, Any]] | None = None) -> int:
        return context_tokens(
            [{"role": "system", "content": system}, {"role": "user", "content": task_text}, *(earlier or []), *latest]
        )

    findings: list[str] = []
    text = head
    if task.inputs:
        for dep, result in task.inputs.items():
            findings += [f.describe(f"input:{dep}") for f in scan(result)]
        room = min(int(budget_tokens * INPUTS_SHARE), budget_tokens - total(head))
        block = _fit_inputs(task.inputs, lambda b: total(f"{head}\n{b}") - total(head) <= room)
        if block is not None:
            text = f"{text}\n{block}"
        else:
            findings = []  # not shown, so nothing was seen

    used = 0
    if memories:
        room = min(int(budget_tokens * MEMORY_SHARE), budget_tokens - total(text))
        for n in range(1, len(memories) + 1):
            if total(f"{text}\n{memory_blocks(memories[:n], tool_output_chars)}") - total(text) > room:
                break
            used = n
        if used:
            text = f"{text}\n{memory_blocks(memories[:used], tool_output_chars)}"
            for hit in memories[:used]:
                findings += [f.describe(f"memory:{hit.memory_id}") for f in scan(hit.text)]

    earlier = [m for step in older for m in step]
    if total(text, earlier) > budget_tokens:
        earlier = []
        lines = [step_line(number, step) for number, step in enumerate(older, start=1)]
        for kept in range(len(lines), -1, -1):
            summary = [{"role": "user", "content": summary_text(lines[len(lines) - kept:], len(lines) - kept)}]
            if total(text, summary) <= budget_tokens:
                earlier = summary
                break

    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}, *earlier, *latest]

    naive = head
    if task.inputs:
        naive = f"{naive}\n{inputs_block(task.inputs, None)}"
    if memories:
        naive = f"{naive}\n{memory_blocks(memories, tool_output_chars)}"
    full = context_tokens([{"role": "system", "content": system}, {"role": "user", "content": naive}, *scratchpad])
    return Assembled(messages, context_tokens(messages), full, findings, used)


def split_steps(scratchpad: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One list per model turn: the assistant message and the tool replies that follow it."""
    steps: list[list[dict[str, Any]]] = []
    for message in scratchpad:
        if message.get("role") == "assistant" or not steps:
            steps.append([message])
        else:
            steps[-1].append(message)
    return steps


def inputs_block(inputs: dict[str, str], each: int | None) -> str:
    """The results of the tasks this one depends on, each cut to `each` characters if given."""
    lines = "\n".join(
        f"[{dep}] {neutralize(result) if each is None else clip(result, each)}" for dep, result in inputs.items()
    )
    return f'<untrusted source="inputs">\n<inputs>\n{lines}\n</inputs>\n</untrusted>'


def _fit_inputs(inputs: dict[str, str], fits: Callable[[str], bool]) -> str | None:
    """The inputs block uncut if it fits, else with every input cut to the longest common length
    that fits (a binary search: cutting is monotone enough), else None."""
    whole = inputs_block(inputs, None)
    if fits(whole):
        return whole
    low, high = 0, max(len(neutralize(r)) for r in inputs.values())
    if not fits(inputs_block(inputs, low)):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(inputs_block(inputs, middle)):
            low = middle
        else:
            high = middle - 1
    return inputs_block(inputs, low)


def memory_blocks(hits: list[MemoryHit], limit: int) -> str:
    """Failure lessons in a block of their own under a heading that says not to repeat them (so
    a past mistake is never read as an example), then the other memories; each cut to `limit`."""
    failures = [f"- {neutralize(h.label)} — {clip(h.text, limit)}" for h in hits if h.label]
    facts = [f"- ({neutralize(h.kind)}) {clip(h.text, limit)}" for h in hits if not h.label]
    blocks = []
    if failures:
        lines = "\n".join(failures)
        blocks.append(f'{FAILURES_HEADING}\n<untrusted source="memory:failures">\n{lines}\n</untrusted>')
    if facts:
        lines = "\n".join(facts)
        blocks.append(f'<untrusted source="memory">\n{lines}\n</untrusted>')
    return "\n".join(blocks)


def step_line(number: int, step: list[dict[str, Any]]) -> str:
    """One earlier step in a line: `- step 2: calculator(expression="12*7") -> 12*7 = 84`."""
    turn = step[0]
    replies = {m.get("tool_call_id"): str(m.get("content") or "") for m in step if m.get("role") == "tool"}
    parts = []
    if turn.get("content"):
        parts.append(f"said: {_short(str(turn['content']), SUMMARY_REPLY_CHARS)}")
    for call in turn.get("tool_calls") or []:
        function = call.get("function") or {}
        reply = replies.get(call.get("id"))
        shown = "no reply" if reply is None else _short(_reply_body(reply), SUMMARY_REPLY_CHARS)
        parts.append(f"{function.get('name')}({_short_arguments(function.get('arguments'))}) -> {shown}")
    # The model's own arguments are neutralized too: they may quote what a tool returned.
    return neutralize(f"- step {number}: " + ("; ".join(parts) or "(no output)"))


def summary_text(lines: list[str], left_out: int) -> str:
    heading = "Earlier steps of this task, oldest first, summarised (the latest step follows in full)"
    if left_out:
        heading += f"; {left_out} older step{'s' if left_out > 1 else ''} left out to fit the context budget"
    if not lines:
        return heading + "."
    body = "\n".join(lines)
    return f'{heading}:\n<untrusted source="earlier-steps">\n{body}\n</untrusted>'


def _reply_body(reply: str) -> str:
    match = _TOOL_OUTPUT.search(reply)
    return match.group(1) if match else reply


def _short_arguments(raw: Any) -> str:
    try:
        arguments = json.loads(raw or "{}")
    except (TypeError, ValueError):
        return _short(str(raw), SUMMARY_ARGUMENT_CHARS)
    if not isinstance(arguments, dict):
        return _short(json.dumps(arguments), SUMMARY_ARGUMENT_CHARS)
    return ", ".join(f"{key}={_short(json.dumps(value), SUMMARY_ARGUMENT_CHARS)}" for key, value in arguments.items())


def _short(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
