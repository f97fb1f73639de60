"""One tool's limits in this replica: its circuit breaker, a cap on calls at once, a timeout per call,
and what each way of failing means for the message and for the breaker.

The concurrency cap is an asyncio semaphore in this process: N replicas run up to N times the
limit. Waiting for a slot counts toward nothing: the timeout starts once the call has one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from services.runtime.errors import Permanent, Retryable, ToolDenied
from services.runtime.metrics import Metrics, ToolErrorKind
from services.tools.breaker import CircuitBreaker, CircuitOpen
from services.tools.registry import ToolFailed, ToolUsageError
from services.tools.settings import ToolLimits

log = logging.getLogger("switchboard.tools")


class ToolLimiter:
    def __init__(
        self, tool: str, limits: ToolLimits, clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None
    ) -> None:
        self.tool = tool
        self.limits = limits
        self.metrics = metrics or Metrics()
        """Records each call's duration and error, and the breaker's state."""
        self.breaker = CircuitBreaker(
            tool, limits.breaker_failures, limits.breaker_reset_s, clock,
            on_change=lambda state: self.metrics.circuit(tool, state),
        )
        self.metrics.circuit(tool, self.breaker.state)
        self._slots = asyncio.Semaphore(limits.concurrency)

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[ToolAttempt]:
        """Admit one call: raises CircuitOpen (Retryable) before it waits for a slot when the
        circuit is open, then holds a slot until the block ends."""
        try:
            admission = self.breaker.admit()
        except CircuitOpen:
            self.metrics.tool_error(self.tool, "circuit_open")
            raise
        attempt = ToolAttempt(self.tool, self.limits.timeout_s, self.metrics)
        try:
            async with self._slots:
                yield attempt
        finally:
            self.breaker.record(admission, attempt.ok)


class ToolAttempt:
    """Runs the call of one admitted attempt and says how it went (`ok`, None until it ran)."""

    def __init__(self, tool: str, timeout_s: float, metrics: Metrics) -> None:
        self.tool = tool
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.ok: bool | None = None

    async def run(self, call: Callable[[], Awaitable[str]]) -> str:
        """The tool's output. Raises Retryable for a transient failure (timeout, 5xx, connection),
        ToolFailed (Permanent) for a crash, and passes on ToolUsageError and ToolDenied."""
        scope = asyncio.timeout(self.timeout_s)
        error: ToolErrorKind | None = None
        started = time.perf_counter()
        try:
            async with scope:
                output = await call()
        except ToolUsageError:
            self.ok = True  # the tool works; the call was wrong, and the model can fix it
            error = "usage"
            raise
        except ToolDenied:
            error = "denied"
            raise  # policy, not health
        except Permanent as exc:
            self.ok = False if exc.reason == "tool_failed" else None
            error = "failed"
            raise
        except Retryable:
            self.ok = False
            error = "transient"
            raise
        except TimeoutError as exc:
            self.ok = False
            error = "timeout"
            why = f"after {self.timeout_s}s" if scope.expired() else f"itself: {exc}"
            raise Retryable(f"{self.tool} timed out {why}") from exc
        except Exception as exc:
            self.ok = False
            error = "failed"
            log.exception("tool %s crashed", self.tool)
            raise ToolFailed(f"{self.tool} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.tool_call(self.tool, time.perf_counter() - started, error)
        self.ok = True
        return output
