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
from services.tools.breaker import CircuitBreaker
from services.tools.registry import ToolFailed, ToolUsageError
from services.tools.settings import ToolLimits

log = logging.getLogger("switchboard.tools")


class ToolLimiter:
    def __init__(self, tool: str, limits: ToolLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.tool = tool
        self.limits = limits
        self.breaker = CircuitBreaker(tool, limits.breaker_failures, limits.breaker_reset_s, clock)
        self._slots = asyncio.Semaphore(limits.concurrency)

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[ToolAttempt]:
        """Admit one call: raises CircuitOpen (Retryable) before it waits for a slot when the
        circuit is open, then holds a slot until the block ends."""
        admission = self.breaker.admit()
        attempt = ToolAttempt(self.tool, self.limits.timeout_s)
        try:
            async with self._slots:
                yield attempt
        finally:
            self.breaker.record(admission, attempt.ok)


class ToolAttempt:
    """Runs the call of one admitted attempt and says how it went (`ok`, None until it ran)."""

    def __init__(self, tool: str, timeout_s: float) -> None:
        self.tool = tool
        self.timeout_s = timeout_s
        self.ok: bool | None = None

    async def run(self, call: Callable[[], Awaitable[str]]) -> str:
        """The tool's output. Raises Retryable for a transient failure (timeout, 5xx, connection),
        ToolFailed (Permanent) for a crash, and passes on ToolUsageError and ToolDenied."""
        scope = asyncio.timeout(self.timeout_s)
        try:
            async with scope:
                output = await call()
        except ToolUsageError:
            self.ok = True  # the tool works; the call was wrong, and the model can fix it
            raise
        except ToolDenied:
            raise  # policy, not health
        except Permanent as exc:
            self.ok = False if exc.reason == "tool_failed" else None
            raise
        except Retryable:
            self.ok = False
            raise
        except TimeoutError as exc:
            self.ok = False
            why = f"after {self.timeout_s}s" if scope.expired() else f"itself: {exc}"
            raise Retryable(f"{self.tool} timed out {why}") from exc
        except Exception as exc:
            self.ok = False
            log.exception("tool %s crashed", self.tool)
            raise ToolFailed(f"{self.tool} failed: {type(exc).__name__}: {exc}") from exc
        self.ok = True
        return output
