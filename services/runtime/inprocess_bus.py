"""The in-process bus: the embedded default and fast unit tests, nothing else.

It keeps the semantics the handlers rely on: every consumer group sees every message of its
topics, up to `max_in_flight` messages are handled at once per group, and messages with the same
key are handled in the order produced (the same KeyedScheduler as the Kafka consumer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

from services.runtime.bus import Delivery
from services.runtime.concurrency import KeyedScheduler
from services.runtime.pipeline import MessagePipeline

log = logging.getLogger("switchboard.bus")

Observer = Callable[[Delivery], Awaitable[None]]


class InProcessBus:
    def __init__(self, max_in_flight: int = 256) -> None:
        self.max_in_flight = max_in_flight
        self._groups: dict[str, asyncio.Queue[Delivery | None]] = {}
        self._routes: dict[str, list[str]] = defaultdict(list)
        self._workers: list[asyncio.Task[None]] = []
        self._offsets: dict[str, int] = defaultdict(int)
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._observers: list[Observer] = []
        self.failures: list[BaseException] = []

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        offset = self._offsets[topic]
        self._offsets[topic] += 1
        for group in self._routes.get(topic, []):
            delivery = Delivery(
                topic=topic, partition=0, offset=offset, key=key, value=value,
                headers=dict(headers), timestamp_ms=int(time.time() * 1000), group=group,
            )
            self._pending += 1
            self._idle.clear()
            self._groups[group].put_nowait(delivery)
        for observer in self._observers:
            await observer(
                Delivery(topic, 0, offset, key, value, dict(headers), int(time.time() * 1000), "")
            )

    def observe(self, observer: Observer) -> None:
        """Call `observer` with every message produced (used to show progress)."""
        self._observers.append(observer)

    def subscribe(self, pipeline: MessagePipeline) -> None:
        group = pipeline.subscription.group
        if group in self._groups:
            raise ValueError(f"consumer group {group} is already subscribed")
        queue: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._groups[group] = queue
        for topic in pipeline.subscription.topics:
            self._routes[topic].append(group)
        self._workers.append(asyncio.create_task(self._work(pipeline, queue), name=group))

    async def _work(self, pipeline: MessagePipeline, queue: asyncio.Queue[Delivery | None]) -> None:
        scheduler = KeyedScheduler(self.max_in_flight)
        while (delivery := await queue.get()) is not None:
            await scheduler.wait_for_room()
            scheduler.submit((delivery.topic, delivery.key), partial(self._handle, pipeline, delivery))
        await scheduler.wait_idle()

    async def _handle(self, pipeline: MessagePipeline, delivery: Delivery) -> None:
        try:
            await pipeline.process(delivery)
        except Exception as exc:  # the embedded run reports it instead of hanging
            log.exception("in-process delivery failed")
            self.failures.append(exc)
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        for queue in self._groups.values():
            queue.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)
