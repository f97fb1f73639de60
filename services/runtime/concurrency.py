"""Many messages in flight, one key at a time: the scheduling core of every consumer.

`KeyedScheduler` runs up to `limit` jobs at once, independent of partitions; jobs that share a
key run strictly one after another in submission order. `PartitionOffsets` tracks which offsets
of a partition are done, so the commit point never passes unfinished work.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable


class KeyedScheduler:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit

    @property
    def room(self) -> int:
        return max(0, self.limit - self.in_flight)

    async def wait_for_room(self, timeout: float | None = None) -> bool:
        """True once a job may be submitted; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._room.wait()
        except TimeoutError:
            return False
        return True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def submit(self, key: Hashable, job: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Start `job` once every earlier job with the same key has finished."""
        if self.full:
            raise RuntimeError("scheduler is full; wait_for_room() first")
        previous = self._tails.get(key)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.full:
            self._room.clear()
        self._idle.clear()
        task = asyncio.create_task(self._run(previous, job))
        self._tails[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return task

    @staticmethod
    async def _run(previous: asyncio.Task[None] | None, job: Callable[[], Awaitable[None]]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled():
                # The earlier message was abandoned (its partition was revoked): running this one
                # would break the key's order, so it is abandoned too and redelivered with it.
                raise asyncio.CancelledError
        await job()

    def _finished(self, key: Hashable, task: asyncio.Task[None]) -> None:
        self.in_flight -= 1
        if self._tails.get(key) is task:
            del self._tails[key]
        if not self.full:
            self._room.set()
        if self.in_flight == 0:
            self._idle.set()


class PartitionOffsets:
    """The offsets of one partition that are in flight, and the next offset safe to commit."""

    def __init__(self) -> None:
        self._in_order: deque[int] = deque()
        self._done: set[int] = set()
        self.commit_point: int | None = None

    def started(self, offset: int) -> None:
        self._in_order.append(offset)

    def finished(self, offset: int) -> int | None:
        """Mark `offset` done. Returns the new commit point when it moved, else None."""
        self._done.add(offset)
        moved = False
        while self._in_order and self._in_order[0] in self._done:
            done = self._in_order.popleft()
            self._done.discard(done)
            self.commit_point = done + 1
            moved = True
        return self.commit_point if moved else None

    @property
    def pending(self) -> int:
        return len(self._in_order)
