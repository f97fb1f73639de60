"""A circuit breaker for one tool in one replica: after N consecutive failures it rejects calls
for a while, then lets a single probe through to decide whether to close again.

Hand-rolled, not a library, after reading purgatory 3.0.1 (the best-kept asyncio option):
- its half-open state lets every call through (`HalfOpenedState.handle_new_request` does
  nothing), where a tool that is still down should see one probe, not a burst;
- an exception it is told not to count is recorded as a success, so a denial would close a
  half-open circuit;
- its shared Redis store is a read-modify-write of a JSON value under global `cbr::` keys, with
  no namespace and no expiry, through a client of its own, and its redis extra pins redis<6;
- it reads `time.time()` itself, so the reset timeout cannot be driven by a test clock.
aiobreaker has had no release since 2021; pybreaker is built for synchronous calls.
So state is per replica: each replica learns on its own that a tool is down (README, "Scale").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from services.runtime.errors import Retryable

log = logging.getLogger("switchboard.tools.breaker")

CircuitState = Literal["closed", "open", "half_open"]


class CircuitOpen(Retryable):
    """The tool's circuit is open: the call is not made, and the message waits in a retry topic."""


@dataclass(frozen=True)
class Admission:
    """A call the breaker let through. `generation` ties its outcome to the state it was let in
    under, so a slow call that started before the circuit opened cannot close it."""

    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failures: int,
        reset_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError("a circuit breaker needs failures >= 1 and reset_s > 0")
        self.name = name
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self.on_change = on_change
        """Told every new state (the metrics' circuit gauge)."""
        self.state: CircuitState = "closed"
        self.failures = 0
        """Consecutive failures while closed."""
        self._opened_at = 0.0
        self._generation = 0
        self._probing = False

    def admit(self) -> Admission:
        """Let a call through, or raise CircuitOpen."""
        if self.state == "open":
            remaining = self._opened_at + self.reset_s - self.clock()
            if remaining > 0:
                raise CircuitOpen(
                    f"circuit open for tool {self.name} after {self.threshold} consecutive failures; "
                    f"it lets a probe through in {remaining:.1f}s",
                    retry_after_s=remaining,
                )
            self._move("half_open")
        if self.state == "half_open":
            if self._probing:
                raise CircuitOpen(
                    f"circuit half-open for tool {self.name}: waiting for its probe call", retry_after_s=1.0
                )
            self._probing = True
            return Admission(self._generation, probe=True)
        return Admission(self._generation, probe=False)

    def record(self, admission: Admission, ok: bool | None) -> None:
        """The outcome of an admitted call: True worked, False failed, None says nothing about
        the tool's health (a denial, or the call never ran). Must be called once per admission."""
        if admission.probe:
            self._probing = False
        if ok is None or admission.generation != self._generation:
            return
        if ok:
            self.failures = 0
            if self.state == "half_open":
                self._move("closed")
            return
        if self.state == "half_open":
            self._open("its probe call failed")
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self._open(f"{self.failures} consecutive failures")

    def _open(self, why: str) -> None:
        self._opened_at = self.clock()
        self._move("open")
        log.warning("circuit for tool %s opened (%s); rejecting calls for %.1fs", self.name, why, self.reset_s)

    def _move(self, state: CircuitState) -> None:
        if state != "open":
            log.info("circuit for tool %s is %s", self.name, state.replace("_", "-"))
        self.state = state
        self.failures = 0
        self._generation += 1
        if self.on_change is not None:
            self.on_change(state)
