"""Runaway detection: decisions on a task's own history, made by the platform, not the model.

A task is runaway when it asks for the same tool with the same canonical arguments N times,
when its steps oscillate A-B-A-B, or when K steps in a row bring back nothing it had not seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from services.runtime.errors import RunawayLoop
from services.runtime.idempotency import canonical_json


@dataclass(frozen=True)
class RunawayLimits:
    repeats: int = 3
    """The same call (tool and canonical arguments) this many times in one task is runaway."""
    stale_steps: int = 3
    """This many steps in a row whose tool results were all seen before is runaway."""


def call_signature(tool: str, arguments: dict[str, Any]) -> str:
    return f"{tool}:{canonical_json(arguments)}"


def step_signature(calls: list[str]) -> str:
    """One step's calls, order-free: the unit an oscillation repeats."""
    return "|".join(sorted(calls))


def result_digest(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


def check_calls(limits: RunawayLimits, history: list[list[str]], step: list[str]) -> None:
    """Before a step's tool calls go out. `history` holds the calls of earlier steps."""
    earlier = [call for calls in history for call in calls]
    for call in set(step):
        count = earlier.count(call) + step.count(call)
        if count >= limits.repeats:
            tool = call.split(":", 1)[0]
            raise RunawayLoop(f"{tool} asked for {count} times with the same arguments: {call[:300]}", "repeated_call")
    steps = [step_signature(calls) for calls in history] + [step_signature(step)]
    if len(steps) >= 4:
        a, b, a2, b2 = steps[-4:]
        if a == a2 and b == b2 and a != b:
            raise RunawayLoop(f"the task oscillates between two steps: {a[:150]} / {b[:150]}", "oscillation")


def stale_after(limits: RunawayLimits, seen: list[str], stale: int, results: list[str]) -> int:
    """After a step's tool results are in: the count of steps in a row that added nothing new.
    Raises RunawayLoop when it reaches the limit."""
    digests = [result_digest(r) for r in results]
    stale = stale + 1 if digests and all(d in seen for d in digests) else 0
    if stale >= limits.stale_steps:
        raise RunawayLoop(f"{stale} steps in a row brought back only results already seen", "no_progress")
    return stale
