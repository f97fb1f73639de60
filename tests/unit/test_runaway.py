"""Runaway detection on a task's own history: repeats, oscillation, steps that learn nothing."""

from __future__ import annotations

import pytest

from services.agents.runaway import (
    RunawayLimits,
    call_signature,
    check_calls,
    result_digest,
    stale_after,
)
from services.runtime.errors import RunawayLoop

LIMITS = RunawayLimits(repeats=3, stale_steps=3)
A = call_signature("calculator", {"expression": "1+1"})
B = call_signature("kb_search", {"query": "kafka", "k": 3})


def test_arguments_are_compared_in_canonical_form() -> None:
    assert call_signature("kb_search", {"k": 3, "query": "kafka"}) == B


def test_the_same_call_a_third_time_is_runaway() -> None:
    check_calls(LIMITS, [[A]], [A])
    with pytest.raises(RunawayLoop, match="calculator asked for 3 times") as caught:
        check_calls(LIMITS, [[A], [A]], [A])
    assert caught.value.reason == "runaway_loop" and caught.value.pattern == "repeated_call"


def test_a_b_a_b_is_runaway_before_any_call_repeats_three_times() -> None:
    check_calls(LIMITS, [[A], [B]], [A])
    with pytest.raises(RunawayLoop, match="oscillates") as caught:
        check_calls(LIMITS, [[A], [B], [A]], [B])
    assert caught.value.pattern == "oscillation"


def test_varied_calls_are_not_runaway() -> None:
    history = [[call_signature("calculator", {"expression": f"{n}+1"})] for n in range(10)]
    check_calls(LIMITS, history, [call_signature("calculator", {"expression": "99+1"})])


def test_steps_that_bring_back_only_known_results_are_runaway() -> None:
    seen: list[str] = []

    stale = stale_after(LIMITS, seen, 0, ["Kafka is a log"])
    assert stale == 0
    seen.append(result_digest("Kafka is a log"))
    stale = stale_after(LIMITS, seen, stale, ["Kafka  is a log"])  # whitespace does not make it new
    stale = stale_after(LIMITS, seen, stale, ["Kafka is a log"])
    assert stale == 2
    assert stale_after(LIMITS, seen, stale, ["Kafka is a distributed log"]) == 0  # something new resets it
    with pytest.raises(RunawayLoop, match="3 steps in a row") as caught:
        stale_after(LIMITS, seen, 2, ["Kafka is a log"])
    assert caught.value.pattern == "no_progress"
